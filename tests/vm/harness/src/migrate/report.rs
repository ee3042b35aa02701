//! JSON output of the migration matrix and its summary statistics.

use serde::Serialize;
use serde_json::{Map, Value};

use super::matrix::{Cell, CellOutcome};
use super::StatsRecord;

/// The result line of one migration of a cell ([`cell_json`]); scenarios
/// fill in the optional fields they report.
#[derive(Debug, Clone, Serialize)]
pub struct CellRecord {
    /// Result name.
    pub name: String,
    /// The guest's balloon driver.
    pub driver: &'static str,
    /// The guest workload.
    pub workload: &'static str,
    /// 1 when the guest ran with `init_on_alloc=1`.
    pub init_on_alloc: u8,
    /// Guest RAM.
    pub mem_mib: u64,
    /// Which migration of the cell (from 1).
    pub migration: usize,
    /// The migration's figures, when it ran.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub figures: Option<StatsRecord>,
    /// The guest's `used_mib` when it was ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_used_mib: Option<Value>,
    /// Guest RAM less its free memory when it was ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_nonfree_mib: Option<u64>,
    /// The integrity verdict.
    #[serde(flatten)]
    pub verdict: VerdictFields,
    /// Migrated, intact, and (on the last migration) no problem.
    pub ok: bool,
    /// What went wrong in the cell.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problems: Option<Vec<String>>,
    /// The cell's serial logs, with its problems.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logs: Option<Vec<String>>,
    /// Which repetition (from 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rep: Option<usize>,
    /// Which attempt of the cell (from 1), when not the first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempt: Option<usize>,
    /// The harness error that ended the cell.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The free page virtqueue's state after the migration.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub free_page_vq: Option<Value>,
    /// The reference driver failed without damage; the cell runs again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference_flake: Option<bool>,
    /// Why the line does not count.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<&'static str>,
}

/// What a result line says of a migration's integrity verdict.
#[derive(Debug, Clone, Serialize)]
pub struct VerdictFields {
    /// `ok` or `CORRUPT` (none without a verdict).
    pub integrity: Option<&'static str>,
    /// The verdict's page count.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pages_checked: Option<Value>,
    /// The verdict's corrupt page count.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub corrupt_pages: Option<Value>,
    /// The verdict's first corrupt pages.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_corrupt: Option<Value>,
}

impl VerdictFields {
    /// The fields of `verdict` (the guest's, if one came).
    pub fn of(verdict: Option<&Map<String, Value>>) -> VerdictFields {
        let field = |k: &str| verdict.and_then(|v| v.get(k)).cloned();
        VerdictFields {
            integrity: verdict.map(|v| {
                if crate::guest::result_ok(v) {
                    "ok"
                } else {
                    "CORRUPT"
                }
            }),
            pages_checked: field("pages_checked"),
            corrupt_pages: field("corrupt_pages"),
            first_corrupt: field("first_corrupt"),
        }
    }
}

/// The result line of one migration of a cell.
pub fn cell_json(cell: &Cell, out: &CellOutcome, index: usize) -> CellRecord {
    let verdict = out.integrity.get(index);
    let ok = out.migrations.get(index).is_some()
        && verdict.is_some_and(crate::guest::result_ok)
        && (index + 1 < out.migrations.len() || out.problems.is_empty());
    let failed = !out.problems.is_empty();
    CellRecord {
        name: format!("migrate/{}", cell.label()),
        driver: cell.driver.name(),
        workload: cell.workload.name(),
        init_on_alloc: u8::from(cell.init_on_alloc),
        mem_mib: cell.mem_mib,
        migration: index + 1,
        figures: out.migrations.get(index).map(|s| s.record()),
        guest_used_mib: out.ready.get("used_mib").cloned(),
        guest_nonfree_mib: out
            .ready
            .get("mem_free_mib")
            .and_then(Value::as_u64)
            .map(|f| cell.mem_mib.saturating_sub(f)),
        verdict: VerdictFields::of(verdict),
        ok,
        problems: failed.then(|| out.problems.clone()),
        logs: failed.then(|| out.logs.clone()),
        rep: None,
        attempt: None,
        error: None,
        free_page_vq: None,
        reference_flake: None,
        note: None,
    }
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
