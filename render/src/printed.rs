//! What `{{ }}` prints never becomes YAML syntax.
//!
//! Row values come from databases that tenants influence, so a value must not
//! decide which fields or objects exist. While a template renders, every
//! string it prints is replaced by a token: a private-use character, digits,
//! another private-use character. YAML reads a token as an ordinary scalar in
//! every place a template can put one (double- or single-quoted, plain, block
//! scalar, flow collection, key). Once the output is parsed, each token is put
//! back as the value's own text, character for character, inside whatever
//! scalar holds it. A value can lengthen a string; it cannot end it.
//!
//! Structures are printed on purpose with `to_json` or `to_yaml` (and a list
//! or mapping printed as it is): their token stands for the whole value. A
//! scalar that is exactly such a token becomes that list or mapping; inside a
//! longer string it is spelled out as JSON or YAML text.
//!
//! Numbers, booleans and null print as themselves: they cannot hold syntax.
//! A string marked safe (`| safe`) prints as it is, for trusted columns only.

use std::cell::RefCell;

use serde_json::Value;

const OPEN: char = '\u{E000}';
const CLOSE: char = '\u{E001}';

/// How a token's value is spelled inside a longer string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spelling {
    Text,
    Json,
    Yaml,
}

impl Spelling {
    fn digit(self) -> char {
        match self {
            Spelling::Text => '0',
            Spelling::Json => '1',
            Spelling::Yaml => '2',
        }
    }
}

/// The values one render printed, by token.
#[derive(Debug, Default)]
pub struct Printed {
    values: Vec<(Spelling, Value)>,
    /// Bytes of the printed values so far, and how many they may take.
    bytes: usize,
    limit: usize,
    exceeded: bool,
    /// Characters of tokens written into the output so far.
    token_bytes: usize,
}

thread_local! {
    static CURRENT: RefCell<Option<Printed>> = const { RefCell::new(None) };
}

/// A nonce per process, so that a row cannot spell a token of its own.
fn nonce() -> &'static str {
    static NONCE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NONCE.get_or_init(|| {
        use std::hash::{BuildHasher as _, Hasher as _};
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u32(std::process::id());
        format!("{:020}", hasher.finish())
    })
}

/// Runs `render` with a fresh table of printed values on this thread, which
/// may hold `limit` bytes of values, and returns its result with the table.
pub(crate) fn capture<T>(limit: usize, render: impl FnOnce() -> T) -> (T, Printed) {
    CURRENT.with(|c| {
        *c.borrow_mut() = Some(Printed {
            limit,
            ..Printed::default()
        });
    });
    let result = render();
    let printed = CURRENT.with(|c| c.borrow_mut().take()).unwrap_or_default();
    (result, printed)
}

/// The token for a string printed by `{{ }}`; the string itself outside a
/// capture.
fn text(value: &str) -> Result<String, minijinja::Error> {
    Ok(token(Spelling::Text, value.len(), || {
        Value::String(value.to_string())
    })?
    .unwrap_or_else(|| value.to_string()))
}

/// What `to_json` and `to_yaml` return: a structure meant to be printed as
/// one. Filters that take text see its JSON or YAML text.
#[derive(Debug)]
pub(crate) struct Structure {
    spelling: Spelling,
    value: Value,
    text: String,
}

impl Structure {
    /// A structure printed as JSON (`to_json`).
    pub(crate) fn json(value: Value) -> Self {
        let text = value.to_string();
        Self {
            spelling: Spelling::Json,
            value,
            text,
        }
    }

    /// A structure printed as YAML (`to_yaml`), whose text is `text`.
    pub(crate) fn yaml(value: Value, text: String) -> Self {
        Self {
            spelling: Spelling::Yaml,
            value,
            text,
        }
    }

    /// Its JSON or YAML text.
    pub(crate) fn text(&self) -> &str {
        &self.text
    }

    /// The same structure with other text (`indent`).
    pub(crate) fn with_text(&self, text: String) -> Self {
        Self {
            spelling: self.spelling,
            value: self.value.clone(),
            text,
        }
    }
}

impl minijinja::value::Object for Structure {
    fn repr(self: &std::sync::Arc<Self>) -> minijinja::value::ObjectRepr {
        minijinja::value::ObjectRepr::Plain
    }

    fn render(self: &std::sync::Arc<Self>, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// What `quote` returns: text meant to be printed as one string, even when
/// it holds JSON. Filters that take text see it double-quoted.
#[derive(Debug)]
pub(crate) struct Quoted {
    text: String,
}

impl Quoted {
    pub(crate) fn new(text: String) -> Self {
        Self { text }
    }
}

impl minijinja::value::Object for Quoted {
    fn repr(self: &std::sync::Arc<Self>) -> minijinja::value::ObjectRepr {
        minijinja::value::ObjectRepr::Plain
    }

    fn render(self: &std::sync::Arc<Self>, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&serde_json::to_string(&self.text).map_err(|_| std::fmt::Error)?)
    }
}

/// Records a printed value of `len` bytes and returns its token; `None`
/// outside a capture. Past the capture's limit it records nothing more and
/// fails the render, so that a loop printing a large value cannot fill memory.
fn token(
    spelling: Spelling,
    len: usize,
    value: impl FnOnce() -> Value,
) -> Result<Option<String>, minijinja::Error> {
    CURRENT.with(|c| {
        let mut current = c.borrow_mut();
        let Some(printed) = current.as_mut() else {
            return Ok(None);
        };
        printed.bytes = printed.bytes.saturating_add(len);
        if printed.bytes > printed.limit {
            printed.exceeded = true;
            return Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                "output limit reached",
            ));
        }
        let n = printed.values.len();
        printed.values.push((spelling, value()));
        let token = format!("{OPEN}{}{}{n}{CLOSE}", nonce(), spelling.digit());
        printed.token_bytes += token.len();
        Ok(Some(token))
    })
}

/// How long output of `written` bytes, tokens included, is once its tokens
/// are spelled out (the printed values' own length), in the current capture.
pub(crate) fn spelled_len(written: usize) -> usize {
    CURRENT.with(|c| match c.borrow().as_ref() {
        Some(printed) => written
            .saturating_sub(printed.token_bytes)
            .saturating_add(printed.bytes),
        None => written,
    })
}

/// The index a token's inner text names, if it is one of `nonce`'s.
fn parse(inner: &str, nonce: &str) -> Option<(Spelling, usize)> {
    let rest = inner.strip_prefix(nonce)?;
    let mut chars = rest.chars();
    let spelling = match chars.next()? {
        '0' => Spelling::Text,
        '1' => Spelling::Json,
        '2' => Spelling::Yaml,
        _ => return None,
    };
    let n: usize = chars.as_str().parse().ok()?;
    Some((spelling, n))
}

impl Printed {
    /// Whether the printed values went past the capture's limit.
    pub(crate) fn exceeded(&self) -> bool {
        self.exceeded
    }

    /// Puts every token of `text` back as its value's text.
    pub fn expand(&self, text: &str) -> Result<String, String> {
        let mut out = String::with_capacity(text.len());
        self.expand_into(text, &mut out, 0)?;
        Ok(out)
    }

    fn expand_into(&self, text: &str, out: &mut String, depth: usize) -> Result<(), String> {
        let mut rest = text;
        while let Some(start) = rest.find(OPEN) {
            out.push_str(&rest[..start]);
            let after = &rest[start + OPEN.len_utf8()..];
            let Some(end) = after.find(CLOSE) else {
                out.push_str(&rest[start..]);
                return Ok(());
            };
            match self.get(&after[..end]) {
                Some((spelling, value)) => {
                    let spelled = match (spelling, value) {
                        (Spelling::Text, Value::String(s)) => s.clone(),
                        (Spelling::Yaml, value) => crate::yaml::to_string(value)
                            .map(|t| t.trim_end_matches('\n').to_string())
                            .map_err(|e| e.to_string())?,
                        (_, value) => value.to_string(),
                    };
                    // A printed string may itself hold tokens (a template
                    // that joins printed JSON into a message, say).
                    if depth < 8 && spelled.contains(OPEN) {
                        self.expand_into(&spelled, out, depth + 1)?;
                    } else {
                        out.push_str(&spelled);
                    }
                }
                // Not ours: a row's own private-use text, kept as it is.
                None => {
                    out.push_str(&rest[start..start + OPEN.len_utf8() + end + CLOSE.len_utf8()])
                }
            }
            rest = &after[end + CLOSE.len_utf8()..];
        }
        out.push_str(rest);
        Ok(())
    }

    fn get(&self, inner: &str) -> Option<(Spelling, &Value)> {
        let (spelling, n) = parse(inner, nonce())?;
        let (stored, value) = self.values.get(n)?;
        (*stored == spelling).then_some((spelling, value))
    }

    /// Puts every token in `value` (parsed template output) back: a string
    /// that is exactly a structure's token becomes the structure, any other
    /// string gets its tokens spelled out. A structure in a key is an error.
    pub fn resolve(&self, value: &mut Value) -> Result<(), String> {
        if self.values.is_empty() {
            return Ok(());
        }
        match value {
            Value::String(s) => {
                if let Some(inner) = s.strip_prefix(OPEN).and_then(|r| r.strip_suffix(CLOSE))
                    && !inner.contains(OPEN)
                    && let Some((Spelling::Json | Spelling::Yaml, structure)) = self.get(inner)
                {
                    *value = structure.clone();
                } else if s.contains(OPEN) {
                    *s = self.expand(s)?;
                }
            }
            Value::Array(items) => {
                for item in items {
                    self.resolve(item)?;
                }
            }
            // Keys rarely hold tokens: rebuild a mapping only when one does.
            Value::Object(map) if !map.keys().any(|k| k.contains(OPEN)) => {
                for field in map.values_mut() {
                    self.resolve(field)?;
                }
            }
            Value::Object(map) => {
                let fields = std::mem::take(map);
                for (key, mut field) in fields {
                    let key = if key.contains(OPEN) {
                        self.key(&key)?
                    } else {
                        key
                    };
                    self.resolve(&mut field)?;
                    if map.insert(key.clone(), field).is_some() {
                        return Err(format!("the key {key:?} appears twice in one mapping"));
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn key(&self, key: &str) -> Result<String, String> {
        if let Some(inner) = key.strip_prefix(OPEN).and_then(|r| r.strip_suffix(CLOSE))
            && let Some((Spelling::Json | Spelling::Yaml, _)) = self.get(inner)
        {
            return Err("a list or mapping (to_json, to_yaml) is printed where a key goes".into());
        }
        self.expand(key)
    }
}

/// Writes `value` as `{{ }}` prints it: see the module documentation.
pub(crate) fn format(value: &minijinja::Value) -> Result<String, minijinja::Error> {
    use minijinja::value::ValueKind;
    let structure = |spelling: Spelling, value: Value, text: &str| {
        Ok(token(spelling, text.len(), || value)?.unwrap_or_else(|| text.to_string()))
    };
    match value.kind() {
        ValueKind::None => Ok("null".into()),
        ValueKind::Undefined => Ok(String::new()),
        ValueKind::Bool | ValueKind::Number => Ok(value.to_string()),
        ValueKind::String if value.is_safe() => Ok(value.as_str().unwrap_or_default().to_string()),
        ValueKind::String => text(value.as_str().unwrap_or_default()),
        ValueKind::Plain => {
            if let Some(s) = value.downcast_object_ref::<Structure>() {
                structure(s.spelling, s.value.clone(), &s.text)
            } else if let Some(quoted) = value.downcast_object_ref::<Quoted>() {
                text(&quoted.text)
            } else {
                text(&value.to_string())
            }
        }
        ValueKind::Seq | ValueKind::Map | ValueKind::Iterable => {
            match serde_json::to_value(value) {
                Ok(json) => {
                    let spelled = json.to_string();
                    structure(Spelling::Json, json, &spelled)
                }
                Err(_) => text(&value.to_string()),
            }
        }
        _ => text(&value.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_expand_to_their_values_and_structures_replace_whole_scalars() {
        let ((a, b, s), printed) = capture(1000, || {
            (
                format(&minijinja::Value::from("x\"\n  hostNetwork: true #")).unwrap(),
                format(&minijinja::Value::from("plain")).unwrap(),
                format(&minijinja::Value::from_object(Structure::json(
                    serde_json::json!({"tier": "gold"}),
                )))
                .unwrap(),
            )
        });
        let mut value = serde_json::json!({
            "env": a,
            "name": format!("pre-{b}-post"),
            "labels": s.clone(),
            "note": format!("labels are {s}"),
        });
        printed.resolve(&mut value).unwrap();
        assert_eq!(value["env"], "x\"\n  hostNetwork: true #");
        assert_eq!(value["name"], "pre-plain-post");
        assert_eq!(value["labels"], serde_json::json!({"tier": "gold"}));
        assert_eq!(value["note"], "labels are {\"tier\":\"gold\"}");
    }

    #[test]
    fn a_forged_token_is_kept_as_text() {
        let forged = format!("{OPEN}000000000000000000000{CLOSE}");
        let (printed_forged, printed) = capture(1000, || {
            let _ = format(&minijinja::Value::from("secret"));
            format(&minijinja::Value::from(forged.clone())).unwrap()
        });
        assert_eq!(printed.expand(&printed_forged).unwrap(), forged);
    }

    #[test]
    fn printed_values_past_the_limit_fail_and_are_not_kept() {
        let (results, printed) = capture(10, || {
            (0..5)
                .map(|_| format(&minijinja::Value::from("abcd")).is_ok())
                .collect::<Vec<_>>()
        });
        assert_eq!(results, [true, true, false, false, false]);
        assert!(printed.exceeded());
        assert_eq!(printed.values.len(), 2);
    }

    #[test]
    fn a_structure_in_a_key_is_refused() {
        let (s, printed) = capture(1000, || {
            format(&minijinja::Value::from_object(Structure::json(
                serde_json::json!(["a"]),
            )))
            .unwrap()
        });
        let mut value = serde_json::json!({ s: 1 });
        let err = printed.resolve(&mut value).unwrap_err();
        assert!(err.contains("where a key goes"), "{err}");
    }
}
