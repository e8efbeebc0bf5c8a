//! Human output: tables with aligned columns, `key: value` blocks, sizes,
//! and the API's JSON pretty-printed for `--json`.

use serde_json::Value;

use super::http::clean;

/// Rows under a header, each column as wide as its widest cell.
#[derive(Debug)]
pub struct Table {
    header: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// An empty table with these column names.
    pub fn new(header: &[&'static str]) -> Table {
        Table {
            header: header.to_vec(),
            rows: Vec::new(),
        }
    }

    /// Add a row (missing cells are empty, extra cells dropped).
    pub fn row(&mut self, cells: Vec<String>) {
        let mut cells: Vec<String> = cells.iter().map(|c| clean(c)).collect();
        cells.resize(self.header.len(), String::new());
        self.rows.push(cells);
    }

    /// The table as text, one line per row, header first. The last column
    /// is not padded, so lines carry no trailing blanks.
    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        let mut out = String::new();
        let header: Vec<String> = self.header.iter().map(|h| (*h).to_owned()).collect();
        for r in std::iter::once(&header).chain(&self.rows) {
            let last = r.len().saturating_sub(1);
            let mut line = String::new();
            for (i, (c, w)) in r.iter().zip(&widths).enumerate() {
                if i == last {
                    line.push_str(c);
                } else {
                    line.push_str(c);
                    let pad = w.saturating_sub(c.chars().count()) + 2;
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// `key: value` lines with the values aligned.
pub fn pairs(items: &[(&str, String)]) -> String {
    let width = items.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (k, v) in items {
        out.push_str(&format!(
            "{:<w$} {}\n",
            format!("{k}:"),
            clean(v),
            w = width + 1
        ));
    }
    out
}

/// A field as text: strings as they are, numbers and booleans written
/// out, `-` for null or missing (so a column is never blank).
pub fn field(v: &Value, key: &str) -> String {
    text(v.get(key).unwrap_or(&Value::Null))
}

/// A value as text (see [`field`]).
pub fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => s.clone(),
        Value::Bool(b) => if *b { "yes" } else { "no" }.into(),
        other => other.to_string(),
    }
}

/// A byte count field in binary units (`-` when absent).
pub fn size_field(v: &Value, key: &str) -> String {
    v.get(key).and_then(Value::as_u64).map_or("-".into(), size)
}

/// Bytes in binary units: `512 B`, `1.5 KiB`, `8.0 GiB`.
pub fn size(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    // Display only: the f64 rounding is far below the one decimal shown.
    #[allow(clippy::cast_precision_loss)]
    let mut x = n as f64 / 1024.0;
    let mut unit = UNITS[0];
    for u in &UNITS[1..] {
        if x < 1024.0 {
            break;
        }
        x /= 1024.0;
        unit = u;
    }
    format!("{x:.1} {unit}")
}

/// The API's JSON answer, indented two spaces per level, with its keys in
/// the order the hub sent them (re-parsing into a map would sort them).
/// `None` if `raw` is not JSON.
pub fn pretty_json(raw: &[u8]) -> Option<String> {
    serde_json::from_slice::<serde::de::IgnoredAny>(raw).ok()?;
    let text = std::str::from_utf8(raw).ok()?;
    let mut out = String::with_capacity(raw.len() * 2);
    let mut depth = 0usize;
    let (mut in_string, mut escaped) = (false, false);
    let mut chars = text.chars().peekable();
    let newline = |out: &mut String, depth: usize| {
        out.push('\n');
        out.extend(std::iter::repeat_n(' ', depth * 2));
    };
    while let Some(c) = chars.next() {
        if in_string {
            out.push(c);
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => {
                in_string = true;
                out.push(c);
            }
            '{' | '[' => {
                out.push(c);
                // Skip whitespace to see whether the container is empty.
                while chars.peek().is_some_and(|n| n.is_whitespace()) {
                    chars.next();
                }
                if matches!(chars.peek(), Some('}' | ']')) {
                    if let Some(close) = chars.next() {
                        out.push(close);
                    }
                } else {
                    depth += 1;
                    newline(&mut out, depth);
                }
            }
            '}' | ']' => {
                depth = depth.saturating_sub(1);
                newline(&mut out, depth);
                out.push(c);
            }
            ',' => {
                out.push(c);
                newline(&mut out, depth);
            }
            ':' => out.push_str(": "),
            c if c.is_whitespace() => {}
            c => out.push(c),
        }
    }
    out.push('\n');
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_and_lines_have_no_trailing_blanks() {
        let mut t = Table::new(&["ID", "NAME", "LAST"]);
        t.row(vec!["1".into(), "a-long-name".into(), String::new()]);
        t.row(vec!["22".into(), "b\x1b[2J".into(), "x".into()]);
        assert_eq!(
            t.render(),
            "ID  NAME         LAST\n1   a-long-name\n22  b [2J        x\n"
        );
        assert_eq!(
            pairs(&[("a", "1".into()), ("long", "2".into())]),
            "a:    1\nlong: 2\n"
        );
    }

    #[test]
    fn sizes_and_fields() {
        assert_eq!(size(512), "512 B");
        assert_eq!(size(1536), "1.5 KiB");
        assert_eq!(size(8 << 30), "8.0 GiB");
        assert_eq!(size(u64::MAX), "16.0 EiB");
        let v = serde_json::json!({"a": null, "b": 3, "c": "x", "d": true, "e": ""});
        let got: Vec<String> = ["a", "b", "c", "d", "e", "z"]
            .iter()
            .map(|k| field(&v, k))
            .collect();
        assert_eq!(got, ["-", "3", "x", "yes", "-", "-"]);
    }

    #[test]
    fn pretty_json_keeps_order_and_content() {
        let raw = br#"{"z":1,"a":[],"s":"a,b:{\"}","o":{"k":[1,{}]}}"#;
        let p = pretty_json(raw).unwrap();
        assert_eq!(
            p,
            "{\n  \"z\": 1,\n  \"a\": [],\n  \"s\": \"a,b:{\\\"}\",\n  \"o\": {\n    \"k\": [\n      1,\n      {}\n    ]\n  }\n}\n"
        );
        let back: Value = serde_json::from_str(&p).unwrap();
        assert_eq!(back, serde_json::from_slice::<Value>(raw).unwrap());
        assert!(pretty_json(b"{not json").is_none());
    }
}
