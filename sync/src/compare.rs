//! One answer to "does the live object hold what Kiln wants?", for apply's
//! plan, its drift correction and `kiln drift --cluster`.
//!
//! Two steps. [`holds`] is the cheap first pass, with no request: every
//! field the tree sets has its value live (ignored fields aside, a Secret's
//! `stringData` against the `data` the server keeps, quantities by value).
//! It may over-report (a value the server normalises in a way it does not
//! know), never under-report. What it reports is settled by a Server-Side
//! Apply dry-run: [`comparable`] strips what is not Kiln's to compare (server
//! bookkeeping, status, Kiln's digest, ignored fields), and [`same`] says
//! whether the dry-run changed anything that is left.

use base64::Engine as _;
use serde_json::Value;

use crate::desired::DIGEST_ANNOTATION;

/// Whether every field of `desired` holds the same value in `live`, but
/// the `ignore` pointers and status. A Secret's `stringData` is compared
/// with the `data` the server stores it as.
pub fn holds(desired: &Value, live: &Value, ignore: &[String]) -> bool {
    // Only a Secret with stringData or an object with status needs a
    // rewritten copy; every other object, on every resync, is compared as is.
    let rewrite = desired.get("status").is_some()
        || (desired["kind"] == "Secret" && desired.get("stringData").is_some());
    if !rewrite {
        return subset(desired, live, &mut String::new(), ignore);
    }
    let mut desired = desired.clone();
    fold_string_data(&mut desired);
    if let Some(map) = desired.as_object_mut() {
        map.remove("status");
    }
    subset(&desired, live, &mut String::new(), ignore)
}

fn subset(desired: &Value, live: &Value, path: &mut String, ignore: &[String]) -> bool {
    if ignore.iter().any(|p| p == path) {
        return true;
    }
    match (desired, live) {
        (Value::Object(d), Value::Object(l)) => d.iter().all(|(k, v)| {
            let len = path.len();
            path.push('/');
            path.push_str(&k.replace('~', "~0").replace('/', "~1"));
            let ok = match l.get(k) {
                Some(lv) => subset(v, lv, path, ignore),
                None => v.is_null() || ignored_below(path, ignore) || empty(v),
            };
            path.truncate(len);
            ok
        }),
        (Value::Array(d), Value::Array(l)) => {
            d.len() == l.len()
                && d.iter().zip(l).enumerate().all(|(i, (dv, lv))| {
                    let len = path.len();
                    path.push_str(&format!("/{i}"));
                    let ok = subset(dv, lv, path, ignore);
                    path.truncate(len);
                    ok
                })
        }
        (Value::Number(d), Value::Number(l)) => d.as_f64() == l.as_f64(),
        (d, l) if d == l => true,
        // The server stores resource quantities canonically: `cpu: 0.5`
        // comes back as "500m", `1024Mi` as "1Gi".
        (d, Value::String(l)) if is_quantity_path(path) => {
            let d = match d {
                Value::Number(n) => n.as_f64(),
                Value::String(s) => quantity(s),
                _ => None,
            };
            d.is_some() && d == quantity(l)
        }
        _ => false,
    }
}

fn is_quantity_path(path: &str) -> bool {
    ["/requests/", "/limits/", "/hard/", "/capacity/"]
        .iter()
        .any(|p| path.contains(p))
}

/// A Kubernetes quantity's value: `500m`, `1.5`, `2Gi`, `1e3`.
fn quantity(text: &str) -> Option<f64> {
    const SUFFIXES: [(&str, f64); 15] = [
        ("Ki", 1024.0),
        ("Mi", 1_048_576.0),
        ("Gi", 1_073_741_824.0),
        ("Ti", 1_099_511_627_776.0),
        ("Pi", 1_125_899_906_842_624.0),
        ("Ei", 1_152_921_504_606_846_976.0),
        ("n", 1e-9),
        ("u", 1e-6),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
    ];
    let text = text.trim();
    for (suffix, factor) in SUFFIXES {
        if let Some(number) = text.strip_suffix(suffix) {
            return number.parse::<f64>().ok().map(|n| n * factor);
        }
    }
    text.parse::<f64>().ok()
}

/// Empty maps and lists are dropped by the server.
fn empty(value: &Value) -> bool {
    match value {
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

fn ignored_below(path: &str, ignore: &[String]) -> bool {
    ignore
        .iter()
        .any(|p| p.starts_with(path) && p[path.len()..].starts_with('/'))
}

fn fold_string_data(object: &mut Value) {
    if object["kind"] != "Secret" || object["apiVersion"] != "v1" {
        return;
    }
    let Some(map) = object.as_object_mut() else {
        return;
    };
    let Some(Value::Object(string_data)) = map.remove("stringData") else {
        return;
    };
    let data = map
        .entry("data")
        .or_insert_with(|| Value::Object(Default::default()));
    if let Some(data) = data.as_object_mut() {
        for (k, v) in string_data {
            let text = v.as_str().unwrap_or_default();
            data.insert(
                k,
                base64::engine::general_purpose::STANDARD
                    .encode(text)
                    .into(),
            );
        }
    }
}

/// The object without what changes on every write or is not Kiln's to
/// compare: server bookkeeping, status, Kiln's digest, ignored fields.
pub fn comparable(object: &Value, ignore: &[String]) -> Value {
    let mut object = object.clone();
    if let Some(map) = object.as_object_mut() {
        map.remove("status");
    }
    if let Some(metadata) = object["metadata"].as_object_mut() {
        for field in [
            "resourceVersion",
            "managedFields",
            "generation",
            "creationTimestamp",
            "uid",
        ] {
            metadata.remove(field);
        }
        if let Some(annotations) = metadata
            .get_mut("annotations")
            .and_then(Value::as_object_mut)
        {
            annotations.remove(DIGEST_ANNOTATION);
            if annotations.is_empty() {
                metadata.remove("annotations");
            }
        }
    }
    for pointer in ignore {
        remove(&mut object, pointer);
    }
    object
}

fn remove(object: &mut Value, pointer: &str) {
    let Some((parent, last)) = pointer.rsplit_once('/') else {
        return;
    };
    let last = last.replace("~1", "/").replace("~0", "~");
    match object.pointer_mut(parent) {
        Some(Value::Object(map)) => {
            map.remove(&last);
        }
        Some(Value::Array(items)) => {
            if let Ok(i) = last.parse::<usize>()
                && i < items.len()
            {
                items.remove(i);
            }
        }
        _ => {}
    }
}

/// Whether the dry-run result `after` changes nothing that matters in
/// `live`.
pub fn same(live: &Value, after: &Value, ignore: &[String]) -> bool {
    comparable(live, ignore) == comparable(after, ignore)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ignored_fields_and_secret_string_data_are_not_drift() {
        let desired = json!({"spec": {"replicas": 3, "template": {"x": 1}}});
        let live = json!({"spec": {"replicas": 5, "template": {"x": 1, "y": 2}}});
        assert!(!holds(&desired, &live, &[]));
        assert!(holds(&desired, &live, &["/spec/replicas".to_string()]));
        let secret =
            json!({"apiVersion": "v1", "kind": "Secret", "stringData": {"password": "hunter2"}});
        let stored =
            json!({"apiVersion": "v1", "kind": "Secret", "data": {"password": "aHVudGVyMg=="}});
        assert!(holds(&secret, &stored, &[]));
    }

    #[test]
    fn bookkeeping_status_and_ignored_fields_are_not_compared() {
        let a = json!({"metadata": {"name": "x", "resourceVersion": "1", "annotations": {DIGEST_ANNOTATION: "a"}},
            "spec": {"replicas": 1, "paused": false}, "status": {"ready": 1}});
        let b = json!({"metadata": {"name": "x", "resourceVersion": "2"},
            "spec": {"replicas": 5, "paused": false}});
        let ignore = ["/spec/replicas".to_string()];
        assert_eq!(comparable(&a, &ignore), comparable(&b, &ignore));
        assert_ne!(comparable(&a, &[]), comparable(&b, &[]));
    }
}
