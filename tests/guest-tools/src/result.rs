//! `@@RESULT {json}` lines: the only output the VM runner parses.

use std::fmt::Write as _;

/// One result object, built field by field in insertion order.
#[derive(Debug, Default)]
pub struct Report {
    fields: Vec<(String, String)>,
}

/// Escapes `s` as a JSON string (with quotes).
pub fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

impl Report {
    /// A report named `name` (`ok` is added by [`Report::emit`]).
    pub fn new(name: &str) -> Self {
        let mut r = Self::default();
        r.raw("name", json_str(name));
        r
    }

    /// Adds a field whose value is already JSON.
    pub fn raw(&mut self, key: &str, json: String) -> &mut Self {
        self.fields.push((key.to_owned(), json));
        self
    }

    /// Adds an unsigned number.
    pub fn num(&mut self, key: &str, v: u64) -> &mut Self {
        self.raw(key, v.to_string())
    }

    /// Adds a float with 3 decimals.
    pub fn float(&mut self, key: &str, v: f64) -> &mut Self {
        let s = if v.is_finite() {
            format!("{v:.3}")
        } else {
            "null".into()
        };
        self.raw(key, s)
    }

    /// Adds a string.
    pub fn text(&mut self, key: &str, v: &str) -> &mut Self {
        self.raw(key, json_str(v))
    }

    /// Adds a boolean.
    pub fn flag(&mut self, key: &str, v: bool) -> &mut Self {
        self.raw(key, v.to_string())
    }

    /// The JSON object with `ok` right after `name`.
    pub fn to_json(&self, ok: bool) -> String {
        let mut s = String::from("{");
        for (i, (k, v)) in self.fields.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            let _ = write!(s, "{}:{}", json_str(k), v);
            if i == 0 {
                let _ = write!(s, ",\"ok\":{ok}");
            }
        }
        s.push('}');
        s
    }

    /// Prints the `@@RESULT` line and returns `ok`.
    pub fn emit(&self, ok: bool) -> bool {
        println!("@@RESULT {}", self.to_json(ok));
        ok
    }
}

/// Extracts an unsigned number field from a flat JSON object (as written by
/// freehint.ko's `stats` file).
pub fn json_u64(json: &str, key: &str) -> Option<u64> {
    let pat = format!("\"{key}\":");
    let start = json.find(&pat)? + pat.len();
    let digits: String = json[start..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

/// Extracts a string field from a flat JSON object (no escapes expected).
pub fn json_text(json: &str, key: &str) -> Option<String> {
    let pat = format!("\"{key}\":\"");
    let start = json.find(&pat)? + pat.len();
    let end = json[start..].find('"')?;
    Some(json[start..start + end].to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_puts_ok_after_name() {
        let mut r = Report::new("x");
        r.num("n", 3)
            .text("s", "a\"b")
            .float("f", 1.5)
            .flag("b", false);
        assert_eq!(
            r.to_json(true),
            r#"{"name":"x","ok":true,"n":3,"s":"a\"b","f":1.500,"b":false}"#
        );
    }

    #[test]
    fn json_fields_are_extracted() {
        let j = r#"{"builds":2,"layout_source":"iomem","walk_ns":12345}"#;
        assert_eq!(json_u64(j, "builds"), Some(2));
        assert_eq!(json_u64(j, "walk_ns"), Some(12345));
        assert_eq!(json_u64(j, "missing"), None);
        assert_eq!(json_text(j, "layout_source").as_deref(), Some("iomem"));
    }
}
