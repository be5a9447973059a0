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
