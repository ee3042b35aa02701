//! JSON output of the migration matrix and its summary statistics.

use serde_json::{json, Map, Value};

use crate::runner::object;

use super::matrix::{Cell, CellOutcome};

/// The JSON line of one migration of a cell.
pub fn cell_json(cell: &Cell, out: &CellOutcome, index: usize) -> Map<String, Value> {
    let mut m = object(json!({
        "name": format!("migrate/{}", cell.label()),
        "driver": cell.driver.name(),
        "workload": cell.workload.name(),
        "init_on_alloc": u8::from(cell.init_on_alloc),
        "mem_mib": cell.mem_mib,
        "migration": index + 1,
    }));
    if let Some(s) = out.migrations.get(index) {
        m.extend(s.to_json());
    }
    if let Some(u) = out.ready.get("used_mib") {
        m.insert("guest_used_mib".into(), u.clone());
    }
    if let Some(f) = out.ready.get("mem_free_mib").and_then(Value::as_u64) {
        m.insert(
            "guest_nonfree_mib".into(),
            json!(cell.mem_mib.saturating_sub(f)),
        );
    }
    let verdict = out.integrity.get(index);
    m.insert(
        "integrity".into(),
        json!(verdict.map(|v| if crate::guest::result_ok(v) {
            "ok"
        } else {
            "CORRUPT"
        })),
    );
    for k in ["pages_checked", "corrupt_pages", "first_corrupt"] {
        if let Some(v) = verdict.and_then(|v| v.get(k)) {
            m.insert(k.into(), v.clone());
        }
    }
    let ok = out.migrations.get(index).is_some()
        && verdict.is_some_and(crate::guest::result_ok)
        && (index + 1 < out.migrations.len() || out.problems.is_empty());
    m.insert("ok".into(), json!(ok));
    if !out.problems.is_empty() {
        m.insert("problems".into(), json!(out.problems));
        m.insert("logs".into(), json!(out.logs));
    }
    m
}

/// Median of `v` (None when empty).
pub fn median(v: &[f64]) -> Option<f64> {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return None;
    }
    s.sort_by(f64::total_cmp);
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }
}
