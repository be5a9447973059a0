//! The one place that names the YAML crate, so that it can be swapped without
//! touching the rest of Kiln.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{Error, Result};

/// Parses every document of a multi-document YAML stream; `origin` (a file
/// name, a template) goes into the error.
pub fn from_str_multi<T: DeserializeOwned>(text: &str, origin: &str) -> Result<Vec<T>> {
    serde_saphyr::from_multiple(text).map_err(|e| Error::InvalidYaml {
        origin: origin.to_string(),
        message: first_line(&e.to_string()),
    })
}

/// Parses what a template rendered: the same as [`from_str_multi`] without
/// the pre-parse budget scan, which doubles the cost of every object. Alias
/// expansion stays bounded by the parser's replay limits.
pub fn from_rendered<T: DeserializeOwned>(text: &str, origin: &str) -> Result<Vec<T>> {
    let mut options = serde_saphyr::Options::default();
    options.budget = None;
    options.emit_comments = false;
    serde_saphyr::from_multiple_with_options(text, options).map_err(|e| Error::InvalidYaml {
        origin: origin.to_string(),
        message: first_line(&e.to_string()),
    })
}

/// Parses a single YAML document.
pub fn from_str<T: DeserializeOwned>(text: &str, origin: &str) -> Result<T> {
    serde_saphyr::from_str(text).map_err(|e| Error::InvalidYaml {
        origin: origin.to_string(),
        message: first_line(&e.to_string()),
    })
}

/// Writes a value as one YAML document.
pub fn to_string<T: Serialize>(value: &T) -> Result<String> {
    serde_saphyr::to_string(value).map_err(|e| Error::YamlOutput {
        message: e.to_string(),
    })
}

/// Writes a JSON value as one YAML document: byte for byte what
/// [`to_string`] writes, several times faster for what templates render.
///
/// Mappings, sequences, integers, booleans, null and strings of one line up
/// to 80 bytes are written here: strings that are plain in YAML 1.1 and 1.2
/// alike as they are, the others as the YAML crate writes them in the same
/// position (asked once per thread and remembered). Anything else (floats,
/// longer or multi-line strings, which the crate folds or writes as block
/// scalars) goes to the YAML crate whole. Debug builds, and so every test,
/// check each document against the crate's own.
pub fn value_to_string(value: &serde_json::Value) -> Result<String> {
    if let serde_json::Value::Object(map) = value
        && !map.is_empty()
    {
        let mut out = String::with_capacity(1024);
        if fast::map(map, 0, false, &mut out).is_some() {
            debug_assert_eq!(out, to_string(value)?, "the fast YAML writer differs");
            // Rendered objects are held until the tree is complete.
            out.shrink_to_fit();
            return Ok(out);
        }
    }
    to_string(value)
}

mod fast {
    use std::cell::RefCell;
    use std::collections::HashMap;

    use serde_json::{Map, Value};

    /// Where a string goes: each position has its own quoting rules.
    #[derive(Clone, Copy)]
    enum Position {
        Key,
        Value,
        Item,
    }

    pub(super) fn map(
        map: &Map<String, Value>,
        indent: usize,
        inline_first: bool,
        out: &mut String,
    ) -> Option<()> {
        for (i, (key, value)) in map.iter().enumerate() {
            if i > 0 || !inline_first {
                pad(out, indent);
            }
            string(key, Position::Key, out)?;
            out.push(':');
            match value {
                Value::Object(m) if m.is_empty() => out.push_str(" {}\n"),
                Value::Array(a) if a.is_empty() => out.push_str(" []\n"),
                Value::Object(m) => {
                    out.push('\n');
                    self::map(m, indent + 2, false, out)?;
                }
                Value::Array(a) => {
                    out.push('\n');
                    sequence(a, indent, false, out)?;
                }
                scalar => {
                    out.push(' ');
                    leaf(scalar, Position::Value, out)?;
                    out.push('\n');
                }
            }
        }
        Some(())
    }

    fn sequence(
        items: &[Value],
        indent: usize,
        inline_first: bool,
        out: &mut String,
    ) -> Option<()> {
        for (i, item) in items.iter().enumerate() {
            if i > 0 || !inline_first {
                pad(out, indent);
            }
            out.push_str("- ");
            match item {
                Value::Object(m) if m.is_empty() => out.push_str("{}\n"),
                Value::Array(a) if a.is_empty() => out.push_str("[]\n"),
                Value::Object(m) => map(m, indent + 2, true, out)?,
                Value::Array(a) => sequence(a, indent + 2, true, out)?,
                scalar => {
                    leaf(scalar, Position::Item, out)?;
                    out.push('\n');
                }
            }
        }
        Some(())
    }

    fn pad(out: &mut String, indent: usize) {
        out.extend(std::iter::repeat_n(' ', indent));
    }

    fn leaf(value: &Value, position: Position, out: &mut String) -> Option<()> {
        match value {
            Value::Null => out.push_str("null"),
            Value::Bool(true) => out.push_str("true"),
            Value::Bool(false) => out.push_str("false"),
            Value::Number(n) if n.is_i64() || n.is_u64() => out.push_str(&n.to_string()),
            Value::String(s) => string(s, position, out)?,
            _ => return None,
        }
        Some(())
    }

    fn string(s: &str, position: Position, out: &mut String) -> Option<()> {
        if plain(s, position) {
            out.push_str(s);
            return Some(());
        }
        if s.len() > 80 || s.contains('\n') {
            return None;
        }
        thread_local! {
            static SPELLED: RefCell<[HashMap<String, String>; 3]> = RefCell::default();
        }
        let slot = position as usize;
        if let Some(spelled) = SPELLED.with(|c| c.borrow()[slot].get(s).cloned()) {
            out.push_str(&spelled);
            return Some(());
        }
        let spelled = ask(s, position)?;
        out.push_str(&spelled);
        SPELLED.with(|c| {
            let remembered = &mut c.borrow_mut()[slot];
            if remembered.len() >= 4096 {
                remembered.clear();
            }
            remembered.insert(s.to_string(), spelled);
        });
        Some(())
    }

    /// How the YAML crate writes `s` in `position`, if on one line.
    fn ask(s: &str, position: Position) -> Option<String> {
        let (document, prefix, suffix) = match position {
            Position::Key => (serde_json::json!({ s: null }), "", ": null\n"),
            Position::Value => (serde_json::json!({ "k": s }), "k: ", "\n"),
            Position::Item => (serde_json::json!([s]), "- ", "\n"),
        };
        let text = super::to_string(&document).ok()?;
        let spelled = text.strip_prefix(prefix)?.strip_suffix(suffix)?;
        (!spelled.contains('\n')).then(|| spelled.to_string())
    }

    /// Whether `s` is certainly written plain, as it is: it starts with a
    /// letter, holds only letters, digits, `.`, `_`, `/`, `-`, inner spaces
    /// and (not in keys) colons that no space follows, does not end with a
    /// colon, and is no word YAML 1.1 or 1.2 reads as a boolean, null or
    /// number. Anything else is asked of the YAML crate.
    fn plain(s: &str, position: Position) -> bool {
        let bytes = s.as_bytes();
        if bytes.len() > 80 || !bytes.first().is_some_and(u8::is_ascii_alphabetic) {
            return false;
        }
        if bytes.last() == Some(&b' ') || bytes.last() == Some(&b':') {
            return false;
        }
        let colons = !matches!(position, Position::Key);
        let mut previous = 0u8;
        for &b in bytes {
            let fine = b.is_ascii_alphanumeric()
                || matches!(b, b'.' | b'_' | b'/' | b'-')
                || (b == b' ' && previous != b':' && previous != b' ')
                || (b == b':' && colons);
            if !fine || (previous == b':' && b == b' ') {
                return false;
            }
            previous = b;
        }
        if bytes.len() <= 5 {
            const WORDS: [&str; 11] = [
                "y", "n", "yes", "no", "on", "off", "true", "false", "null", "nan", "inf",
            ];
            if WORDS.iter().any(|w| s.eq_ignore_ascii_case(w)) {
                return false;
            }
        }
        true
    }
}

fn first_line(message: &str) -> String {
    message.lines().next().unwrap_or_default().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    #[test]
    fn round_trip_keeps_key_order_and_types() {
        let text = "kind: ConfigMap\napiVersion: v1\nmetadata:\n  name: a\ndata:\n  z: \"1\"\n  a: \"2\"\nreplicas: 3\nratio: 0.5\nflag: true\nnothing: null\n";
        let value: Value = from_str(text, "test").unwrap();
        let keys: Vec<&str> = value
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            [
                "kind",
                "apiVersion",
                "metadata",
                "data",
                "replicas",
                "ratio",
                "flag",
                "nothing"
            ]
        );
        assert_eq!(value["replicas"], json!(3));
        assert_eq!(value["data"]["z"], json!("1"));
        let again: Value = from_str(&to_string(&value).unwrap(), "again").unwrap();
        assert_eq!(again, value);
    }

    #[test]
    fn multi_document_streams_split() {
        let docs: Vec<Value> = from_str_multi("a: 1\n---\nb: 2\n", "stream").unwrap();
        assert_eq!(docs, [json!({"a": 1}), json!({"b": 2})]);
    }

    #[test]
    fn invalid_yaml_names_its_origin() {
        let err = from_str::<Value>("a: [1, 2\n", "fixtures/bad.yaml").unwrap_err();
        let message = err.to_string();
        assert!(
            message.starts_with("invalid YAML in fixtures/bad.yaml: "),
            "{message}"
        );
        assert!(!message.contains('\n'), "{message}");
    }
}

#[cfg(test)]
mod fast_writer {
    use super::*;
    use serde_json::{Value, json};

    /// Strings of every kind the writer treats differently, and the
    /// corners of YAML's quoting rules.
    fn strings() -> Vec<String> {
        let mut all: Vec<String> = [
            "a",
            "abc",
            "Tenant 1",
            "tenant-t00001",
            "app.kubernetes.io/name",
            "y",
            "Y",
            "n",
            "yes",
            "Yes",
            "YES",
            "no",
            "No",
            "on",
            "ON",
            "Off",
            "true",
            "True",
            "FALSE",
            "null",
            "Null",
            "~",
            "nan",
            "NaN",
            ".nan",
            "inf",
            "-inf",
            ".Inf",
            "1",
            "0.5",
            "1e3",
            "0x1F",
            "0o17",
            "017",
            "1_000",
            "1:20",
            "12:30:45",
            "2001-12-14",
            "2001-12-14t21:59:43.10-05:00",
            "",
            " ",
            " a",
            "a ",
            "a  b",
            "a: b",
            "a:b",
            "a:",
            ":a",
            "a #b",
            "a#b",
            "#a",
            "-",
            "- a",
            "-a",
            "--- a",
            "---",
            "...",
            "?",
            "? a",
            "?a",
            "<<",
            "=",
            "*x",
            "&x",
            "!x",
            "|x",
            ">x",
            "%x",
            "@x",
            "`x",
            "'",
            "\"",
            "a'b",
            "a\"b",
            "{a}",
            "[a]",
            "a,b",
            "a\tb",
            "a\u{7}b",
            "é",
            "naïve",
            "日本",
            "a\u{FEFF}",
            "\u{E000}x",
            "https://example.com/x?y=1&z=2",
            "500m",
            "8Gi",
            "/spec/replicas",
            "e",
            "E5",
            "x\ny",
            "x\n",
            "\n",
            "a\r\nb",
            "0",
            "-1",
            "+1",
            "00",
            "0b101",
            "1.0.0",
            "v1",
            "apps/v1",
            "a/b: c",
            "a :b",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        all.push("x".repeat(80));
        all.push("x".repeat(81));
        all.push(format!("{} {}", "x".repeat(40), "y".repeat(45)));
        all
    }

    fn check(value: &Value) {
        let fast = value_to_string(value).unwrap();
        assert_eq!(fast, to_string(value).unwrap(), "{value}");
    }

    #[test]
    fn writes_what_the_yaml_crate_writes_for_every_kind_of_string() {
        for s in strings() {
            check(&json!({ s.clone(): s.clone() }));
            check(
                &json!({"list": [s.clone(), {s.clone(): [s.clone()]}], "nested": {"k": s.clone()}}),
            );
        }
    }

    #[test]
    fn a_typical_object_takes_the_fast_path() {
        let object = json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "labels": {"app": "web", "tier": "500m"}},
            "spec": {"replicas": 2, "template": {"spec": {"containers": [{"name": "web", "ports": [{"containerPort": 8080}]}]}}},
        });
        let mut out = String::new();
        assert!(fast::map(object.as_object().unwrap(), 0, false, &mut out).is_some());
        assert_eq!(out, to_string(&object).unwrap());
        let float = json!({"ratio": 0.5});
        assert!(fast::map(float.as_object().unwrap(), 0, false, &mut String::new()).is_none());
    }

    #[test]
    fn writes_what_the_yaml_crate_writes_for_every_shape() {
        check(&json!({
            "a": [[1, 2], [], {}], "b": [{"x": 1, "y": [1]}, {"z": {"w": 1}}],
            "e": {}, "f": [], "g": null, "h": 1.5, "i": 1e20, "j": -3, "k": true,
            "u": 18446744073709551615u64, "deep": [[["x"]]], "m": [{"a": {"b": [{}]}}],
        }));
        check(&json!({"top": [{"a": [{"b": [[{"c": []}]]}]}]}));
        for snapshot in
            std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/snapshots")).unwrap()
        {
            let text = std::fs::read_to_string(snapshot.unwrap().path()).unwrap();
            for document in text.split("\n---\n") {
                if let Ok(value) = from_str::<Value>(document, "snapshot") {
                    check(&value);
                }
            }
        }
    }
}

#[cfg(test)]
mod quoting {
    use super::*;
    use serde_json::{Value, json};

    /// Strings that YAML 1.1 readers (kubectl, ArgoCD, Flux: go-yaml) would
    /// take for another type must come out quoted.
    #[test]
    fn ambiguous_strings_stay_strings_for_yaml_1_1_readers() {
        // Every form YAML 1.1 reads as a boolean, a null, a number or a
        // date: each must be written quoted.
        let ambiguous = [
            "on",
            "off",
            "yes",
            "no",
            "y",
            "n",
            "Yes",
            "YES",
            "No",
            "NO",
            "ON",
            "On",
            "Off",
            "OFF",
            "Y",
            "N",
            "1_000",
            "12:30",
            "0x1F",
            "2024-01-01",
            "2024-01-01T10:00:00Z",
            "true",
            "True",
            "null",
            "~",
            "1",
            "0755",
            "1e3",
            ".5",
        ];
        // Strings that must merely survive.
        let awkward = [
            "-",
            "a: b",
            "#x",
            "",
            " lead",
            "trail ",
            "@at",
            "*star",
            "!bang",
            "%p",
            "multi\nline\n",
            "tab\there",
            "é☃",
        ];
        let tricky: Vec<&str> = ambiguous.iter().chain(&awkward).copied().collect();
        let value = Value::Object(
            tricky
                .iter()
                .enumerate()
                .map(|(i, s)| (format!("k{i}"), json!(s)))
                .collect(),
        );
        let text = to_string(&value).unwrap();
        let back: Value = from_str(&text, "quoting").unwrap();
        assert_eq!(back, value, "{text}");
        for (i, s) in tricky.iter().enumerate() {
            let line = text
                .lines()
                .find(|l| l.starts_with(&format!("k{i}:")))
                .unwrap();
            let scalar = line.split_once(": ").map_or("", |(_, v)| v);
            if ambiguous.contains(s) {
                assert!(
                    scalar.starts_with('"') || scalar.starts_with('\''),
                    "{s:?} is written unquoted: {line}"
                );
            }
        }
    }
}
