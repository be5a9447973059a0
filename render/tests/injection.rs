//! Rows are hostile input: whatever a row value holds and wherever a template
//! prints it, it is kept verbatim as one value or the render is refused. It
//! never adds a field, a list item or an object, and never changes `kind`,
//! `apiVersion`, `metadata.name` or `metadata.namespace`.

#![allow(clippy::unwrap_used)] // a test that cannot go on fails, with the cause

use serde_json::{Value, json};

mod common;

/// Values a tenant might type into a signup form, aimed at YAML's syntax.
const PAYLOADS: &[&str] = &[
    "x\"\n      hostNetwork: true #",
    "x\"\n        securityContext: {privileged: true} #",
    "x\"\n  namespace: kube-system #",
    "x'\n  namespace: kube-system #",
    "acme.example.com\n  - host: shop.globex.example.com",
    "a\rb: c",
    "a\r\n  injected: true",
    "a\tb: c",
    "a\u{85}injected: true",
    "a\u{2028}injected: true",
    "a\u{2029}injected: true",
    "\n---\napiVersion: v1\nkind: Secret\nmetadata: {name: stolen}",
    "---",
    "...",
    "# comment",
    "a # comment",
    "a: b",
    "key: value\nother: value",
    "{a: b}",
    "}",
    "{",
    "]",
    "[x, y]",
    "&anchor x",
    "*alias",
    "!!binary aGk=",
    "!tag x",
    "- item",
    "? complex",
    "\"",
    "'",
    "\"\"",
    "''",
    "|",
    "|\n  block",
    ">-",
    "@at",
    "`tick",
    "%YAML 1.2",
    "",
    " leading space",
    "trailing space ",
    "null",
    "~",
    "true",
    "123",
    "0x1F",
    "1e3",
    "\\",
    "\\n",
    "<<: {injected: true}",
    "\u{E000}00000000000000000000000\u{E001}",
    "{{ row.v }}",
    "{% raw %}",
];

/// (site, template line under `data:`), each a different way a template can
/// print a value.
const SITES: &[(&str, &str)] = &[
    ("double-quoted", "  dq: \"{{ row.v }}\""),
    ("single-quoted", "  sq: '{{ row.v }}'"),
    ("plain", "  plain: {{ row.v }}"),
    ("quote filter", "  quoted: {{ row.v | quote }}"),
    ("prefixed", "  prefixed: pre-{{ row.v }}-post"),
    ("block scalar", "  block: |\n    {{ row.v }}"),
    ("folded scalar", "  folded: >-\n    {{ row.v }}"),
    ("flow mapping", "  flow: {inner: {{ row.v }}, fixed: kept}"),
    ("flow sequence", "  seq: [{{ row.v }}, kept]"),
    ("key", "  {{ row.v }}: at-key"),
    (
        "macro",
        "  {% macro m() %}{{ row.v }}{% endmacro %}mac: {{ m() }}",
    ),
    (
        "set block",
        "  {% set b %}{{ row.v }}{% endset %}setb: {{ b }}",
    ),
    ("escape filter", "  esc: {{ row.v | e }}"),
];

fn expected(site: &str, payload: &str) -> Value {
    match site {
        "prefixed" => json!(format!("pre-{payload}-post")),
        "block scalar" => json!(format!("{payload}\n")),
        "flow mapping" => json!({"inner": payload, "fixed": "kept"}),
        "flow sequence" => json!([payload, "kept"]),
        _ => json!(payload),
    }
}

/// Renders one row `{id: t, v: payload}` through `template`; the object, or
/// the error.
fn render_one(template: &str, payload: &str) -> Result<Value, String> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("rows.json"),
        serde_json::to_string(&json!([{"id": "t", "v": payload}])).unwrap(),
    )
    .unwrap();
    let indented: String = template.lines().map(|l| format!("      {l}\n")).collect();
    std::fs::write(
        dir.path().join("kiln.yaml"),
        format!(
            "apiVersion: kiln.dev/v1alpha1\nkind: Source\nmetadata: {{name: rows}}\n\
             spec: {{url: \"file:rows.json\", key: id}}\n---\n\
             apiVersion: kiln.dev/v1alpha1\nkind: Blueprint\nmetadata: {{name: app}}\n\
             spec:\n  source: rows\n  namespace: tenant-t\n  resources:\n  - id: probe\n    template: |\n{indented}"
        ),
    )
    .unwrap();
    let rendered = common::render_config(&dir.path().join("kiln.yaml"))?;
    assert_eq!(rendered.instances.len(), 1);
    let objects = &rendered.instances[0].objects;
    assert_eq!(objects.len(), 1, "one object, never more");
    Ok(objects[0].value().unwrap())
}

const HEAD: &str = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: probe\ndata:\n";

#[test]
fn every_payload_at_every_site_is_kept_verbatim_or_refused() {
    let mut refused = Vec::new();
    for (site, line) in SITES {
        for payload in PAYLOADS {
            let template = format!("{HEAD}{line}\n  fixed: kept\n");
            let object = match render_one(&template, payload) {
                Ok(object) => object,
                Err(e) => {
                    // A refusal is one line that names where.
                    assert_eq!(e.lines().count(), 1, "{site} {payload:?}: {e}");
                    assert!(e.contains("row t") && e.contains("resource probe"), "{e}");
                    refused.push(format!("{site} {payload:?}: {e}"));
                    continue;
                }
            };
            let what = format!("{site}, payload {payload:?}: {object}");
            assert_eq!(object["apiVersion"], "v1", "{what}");
            assert_eq!(object["kind"], "ConfigMap", "{what}");
            assert_eq!(object["metadata"]["name"], "probe", "{what}");
            assert_eq!(object["metadata"]["namespace"], "tenant-t", "{what}");
            let top: Vec<&String> = object.as_object().unwrap().keys().collect();
            assert_eq!(top, ["apiVersion", "kind", "metadata", "data"], "{what}");
            let data = object["data"].as_object().unwrap();
            assert_eq!(data.len(), 2, "exactly the template's two fields: {what}");
            assert_eq!(data["fixed"], "kept", "{what}");
            if *site == "key" {
                assert_eq!(data[*payload], "at-key", "{what}");
            } else {
                let (_, value) = data.iter().find(|(k, _)| *k != "fixed").unwrap();
                assert_eq!(*value, expected(site, payload), "{what}");
            }
        }
    }
    // Nothing here needs refusing: every value fits as a value.
    assert!(refused.is_empty(), "{refused:#?}");
}

#[test]
fn a_payload_in_a_name_or_namespace_is_kept_as_one_value_or_refused() {
    for payload in PAYLOADS {
        let template =
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: \"p-{{ row.v }}\"\ndata: {a: b}\n";
        match render_one(template, payload) {
            Ok(object) => {
                assert_eq!(object["metadata"]["name"], format!("p-{payload}"));
                assert_eq!(object["metadata"]["namespace"], "tenant-t");
            }
            Err(e) => assert!(e.contains("metadata.name"), "{payload:?}: {e}"),
        }
        let template = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: probe\n  namespace: {{ row.v }}\ndata: {a: b}\n";
        match render_one(template, payload) {
            Ok(object) => {
                assert_eq!(object["metadata"]["namespace"], *payload);
                assert_eq!(object["metadata"]["name"], "probe");
            }
            Err(e) => assert!(e.contains("metadata.namespace"), "{payload:?}: {e}"),
        }
    }
}

#[test]
fn structures_are_printed_on_purpose_and_never_as_keys() {
    let rows_template = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: s\n  labels: {{ {'tier': row.v} | to_json }}\n  annotations:\n    as-text: {{ {'tier': row.v} | to_json | quote }}\ndata:\n  settings.yaml: |\n    {{ {'tier': row.v} | to_yaml | indent(4) }}\n";
    for payload in PAYLOADS {
        let object = render_one(rows_template, payload).unwrap();
        let labels = object["metadata"]["labels"].as_object().unwrap();
        assert_eq!(labels["tier"], *payload);
        assert!(
            labels.keys().all(|k| k == "tier"
                || k.starts_with("kiln.dev/")
                || k.starts_with("app.kubernetes.io/")),
            "{labels:?}"
        );
        assert_eq!(
            object["metadata"]["annotations"]["as-text"],
            json!({"tier": payload}).to_string()
        );
        let yaml: Value = serde_json::to_value(
            kiln_render::yaml::from_str::<Value>(
                object["data"]["settings.yaml"].as_str().unwrap(),
                "settings",
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(yaml, json!({"tier": payload}));
    }
    let err = render_one(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: k}\ndata:\n  {{ [row.v] | to_json }}: x\n",
        "a",
    )
    .unwrap_err();
    assert!(err.contains("where a key goes"), "{err}");
}
