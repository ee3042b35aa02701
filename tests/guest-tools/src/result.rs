//! `@@RESULT {json}` lines: the only output the VM runner parses.

use serde_json::{Map, Value};

/// One result object, built field by field (serialized by serde_json).
#[derive(Debug, Default)]
pub struct Report {
    fields: Map<String, Value>,
}

impl Report {
    /// A report named `name` (`ok` is added by [`Report::emit`]).
    pub fn new(name: &str) -> Self {
        let mut r = Self::default();
        r.fields.insert("name".into(), name.into());
        r
    }

    /// Adds an unsigned number.
    pub fn num(&mut self, key: &str, v: u64) -> &mut Self {
        self.fields.insert(key.into(), v.into());
        self
    }

    /// Adds a float, rounded to 3 decimals (`null` if not finite).
    pub fn float(&mut self, key: &str, v: f64) -> &mut Self {
        self.fields
            .insert(key.into(), ((v * 1e3).round() / 1e3).into());
        self
    }

    /// Adds a string.
    pub fn text(&mut self, key: &str, v: &str) -> &mut Self {
        self.fields.insert(key.into(), v.into());
        self
    }

    /// Adds a boolean.
    pub fn flag(&mut self, key: &str, v: bool) -> &mut Self {
        self.fields.insert(key.into(), v.into());
        self
    }

    /// The JSON object, with `ok`.
    pub fn to_json(&self, ok: bool) -> String {
        let mut fields = self.fields.clone();
        fields.insert("ok".into(), ok.into());
        Value::Object(fields).to_string()
    }

    /// Prints the `@@RESULT` line and returns `ok`.
    pub fn emit(&self, ok: bool) -> bool {
        println!("@@RESULT {}", self.to_json(ok));
        ok
    }
}

/// An unsigned number field of a JSON object (as freehint.ko's `stats`
/// file writes it).
pub fn json_u64(json: &str, key: &str) -> Option<u64> {
    serde_json::from_str::<Value>(json).ok()?.get(key)?.as_u64()
}

/// A string field of a JSON object.
pub fn json_text(json: &str, key: &str) -> Option<String> {
    let v = serde_json::from_str::<Value>(json).ok()?;
    v.get(key)?.as_str().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_is_one_json_object_with_ok() {
        let mut r = Report::new("x");
        r.num("n", 3)
            .text("s", "a\"b\n")
            .float("f", 1.23456)
            .float("inf", f64::INFINITY)
            .flag("b", false);
        let v: Value = serde_json::from_str(&r.to_json(true)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"name": "x", "ok": true, "n": 3, "s": "a\"b\n",
                               "f": 1.235, "inf": null, "b": false})
        );
    }

    #[test]
    fn json_fields_are_extracted() {
        let j = "{\"builds\":2,\"layout_source\":\"iomem\",\"walk_ns\":12345}\n";
        assert_eq!(json_u64(j, "builds"), Some(2));
        assert_eq!(json_u64(j, "walk_ns"), Some(12345));
        assert_eq!(json_u64(j, "missing"), None);
        assert_eq!(json_u64(j, "layout_source"), None);
        assert_eq!(json_text(j, "layout_source").as_deref(), Some("iomem"));
    }
}
