//! Templates: one sandboxed minijinja environment per blueprint, compiled
//! once, with strict undefined variables and Kiln's filters.
//!
//! A template has no access to the environment, files or the network: no
//! loader is configured, and no function that reaches outside is registered.

use std::sync::Arc;

use base64::Engine as _;
use minijinja::value::Value;
use minijinja::{Environment, ErrorKind, UndefinedBehavior};
use sha2::{Digest, Sha256};

use crate::yaml;

/// The longest DNS label.
pub const DNS_LABEL_MAX: usize = 63;

/// Whether `s` is an RFC 1123 DNS label.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= DNS_LABEL_MAX
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Makes `input` a DNS label: lowercase, anything but `[a-z0-9-]` replaced by
/// `-`, no leading or trailing `-`. A label longer than 63 is cut and ends in
/// 8 hex digits of the input's SHA-256, so that long inputs that share a
/// prefix stay distinct.
pub fn dns_label(input: &str) -> String {
    let mapped: String = input
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    let trimmed = mapped.trim_matches('-');
    let label = if trimmed.is_empty() { "x" } else { trimmed };
    if label.len() <= DNS_LABEL_MAX {
        return label.to_string();
    }
    let hash = hex(&Sha256::digest(input.as_bytes()))[..8].to_string();
    let keep = DNS_LABEL_MAX - hash.len() - 1;
    format!("{}-{hash}", label[..keep].trim_end_matches('-'))
}

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A blueprint's compiled templates.
#[derive(Debug, Clone)]
pub struct Templates {
    env: Arc<Environment<'static>>,
}

/// Where a template came from, for error messages.
#[derive(Debug, Clone)]
pub struct Origin {
    /// The name the template is registered under: the template file as the
    /// configuration names it, or `<blueprint>/<id> (inline)`.
    pub name: String,
}

/// A template that failed, as a message without the row and resource context.
#[derive(Debug, Clone)]
pub struct Failure {
    /// What went wrong, with the expression where it helps.
    pub message: String,
    /// `file:line` of the failure, when known.
    pub location: Option<String>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.location {
            Some(location) => write!(f, "{} ({location})", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl Templates {
    /// Compiles `(name, source)` pairs; the first error of each template is
    /// returned with its name.
    pub fn compile(templates: Vec<(String, String)>) -> Result<Self, Vec<(String, Failure)>> {
        let mut env = environment();
        let mut errors = Vec::new();
        for (name, source) in templates {
            if let Err(e) = env.add_template_owned(name.clone(), source.clone()) {
                errors.push((name, failure(&e, &source)));
            }
        }
        if errors.is_empty() {
            Ok(Self { env: Arc::new(env) })
        } else {
            Err(errors)
        }
    }

    /// Renders template `name` with `context`.
    pub fn render(&self, name: &str, context: &Value) -> Result<String, Failure> {
        let template = self.env.get_template(name).map_err(|e| failure(&e, ""))?;
        template
            .render(context)
            .map_err(|e| failure(&e, template.source()))
    }
}

fn failure(error: &minijinja::Error, source: &str) -> Failure {
    let mut message = match error.detail() {
        Some(detail) => format!("{}: {detail}", error.kind()),
        None => error.kind().to_string(),
    };
    if error.kind() == ErrorKind::UndefinedError
        && let Some(expr) = error.range().and_then(|r| source.get(r))
    {
        message = format!("undefined variable {}", expr.trim());
    }
    let location = match (error.name(), error.line()) {
        (Some(name), Some(line)) => Some(format!("{name}:{line}")),
        (Some(name), None) => Some(name.to_string()),
        _ => None,
    };
    Failure { message, location }
}

fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    // Output is YAML, not HTML.
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
    // NULL columns must read back as YAML null, not the string "none".
    env.set_formatter(|out, state, value| {
        if value.is_none() {
            out.write_str("null").map_err(minijinja::Error::from)
        } else {
            minijinja::escape_formatter(out, state, value)
        }
    });
    env.add_filter("dns_label", |v: String| dns_label(&v));
    env.add_filter("to_yaml", to_yaml);
    env.add_filter("to_json", to_json);
    env.add_filter("from_json", from_json);
    env.add_filter("b64encode", |v: String| {
        base64::engine::general_purpose::STANDARD.encode(v)
    });
    env.add_filter("b64decode", b64decode);
    env.add_filter("sha256", |v: String| hex(&Sha256::digest(v.as_bytes())));
    env.add_filter("quote", quote);
    env.add_filter("required", required);
    env.add_function("required", required);
    env
}

fn invalid(message: String) -> minijinja::Error {
    minijinja::Error::new(ErrorKind::InvalidOperation, message)
}

fn to_yaml(value: Value) -> Result<String, minijinja::Error> {
    let text = yaml::to_string(&value).map_err(|e| invalid(format!("to_yaml: {e}")))?;
    Ok(text.trim_end_matches('\n').to_string())
}

fn to_json(value: Value) -> Result<String, minijinja::Error> {
    serde_json::to_string(&value).map_err(|e| invalid(format!("to_json: {e}")))
}

fn from_json(text: String) -> Result<Value, minijinja::Error> {
    let parsed: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| invalid(format!("from_json: invalid JSON: {e}")))?;
    Ok(Value::from(minijinja::value::Serde(parsed)))
}

fn b64decode(text: String) -> Result<String, minijinja::Error> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|e| invalid(format!("b64decode: invalid base64: {e}")))?;
    String::from_utf8(bytes)
        .map_err(|_| invalid("b64decode: the decoded bytes are not UTF-8".into()))
}

/// A YAML double-quoted scalar (JSON string syntax is valid YAML); none
/// quotes as the empty string, as Helm's `quote` does with nil.
fn quote(value: Value) -> Result<String, minijinja::Error> {
    let text = match value.as_str() {
        Some(s) => s.to_string(),
        None if value.is_none() || value.is_undefined() => String::new(),
        None => value.to_string(),
    };
    serde_json::to_string(&text).map_err(|e| invalid(format!("quote: {e}")))
}

fn required(value: Value, message: Option<String>) -> Result<Value, minijinja::Error> {
    let missing =
        value.is_undefined() || value.is_none() || value.as_str().is_some_and(str::is_empty);
    if missing {
        Err(invalid(message.unwrap_or_else(|| {
            "a required value is missing or empty".into()
        })))
    } else {
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use minijinja::context;

    fn render(source: &str, ctx: Value) -> Result<String, Failure> {
        let t = Templates::compile(vec![("t.j2".into(), source.into())])
            .map_err(|mut e| e.remove(0).1)?;
        t.render("t.j2", &ctx)
    }

    #[test]
    fn dns_label_makes_valid_distinct_labels() {
        assert_eq!(dns_label("Acme_Corp.EU"), "acme-corp-eu");
        assert_eq!(dns_label("--x--"), "x");
        assert_eq!(dns_label("!!!"), "x");
        let a = dns_label(&format!("{}a", "t".repeat(80)));
        let b = dns_label(&format!("{}b", "t".repeat(80)));
        assert_ne!(a, b);
        for label in [&a, &b] {
            assert!(is_dns_label(label), "{label}");
            assert_eq!(label.len(), 63);
        }
    }

    #[test]
    fn filters_do_what_their_names_say() {
        let ctx = context! { row => context! { name => "acme", tags => vec!["a", "b"], doc => r#"{"x": [1, 2]}"# } };
        assert_eq!(
            render("{{ row.name | b64encode }}", ctx.clone()).unwrap(),
            "YWNtZQ=="
        );
        assert_eq!(
            render("{{ 'YWNtZQ==' | b64decode }}", ctx.clone()).unwrap(),
            "acme"
        );
        assert_eq!(
            render("{{ row.name | sha256 }}", ctx.clone()).unwrap(),
            "822b33ad87c148a0a20a5ba7cd5ebcaa68d36a18e7aad165554903f52ca82757"
        );
        assert_eq!(
            render("{{ row.tags | to_json }}", ctx.clone()).unwrap(),
            r#"["a","b"]"#
        );
        assert_eq!(
            render("{{ (row.doc | from_json).x[1] }}", ctx.clone()).unwrap(),
            "2"
        );
        assert_eq!(
            render("{{ 'say \"hi\"' | quote }}", ctx.clone()).unwrap(),
            r#""say \"hi\"""#
        );
        assert_eq!(render("{{ none | quote }}", ctx.clone()).unwrap(), r#""""#);
        assert_eq!(
            render("{{ row.tags | to_yaml }}", ctx.clone()).unwrap(),
            "- a\n- b"
        );
        assert_eq!(
            render("{{ row.missing | default('d') }}", ctx.clone()).unwrap(),
            "d"
        );
    }

    #[test]
    fn from_json_rejects_bad_json() {
        let err = render("{{ 'nope' | from_json }}", Value::UNDEFINED).unwrap_err();
        assert!(err.message.contains("from_json: invalid JSON"), "{err}");
    }

    #[test]
    fn undefined_variables_are_errors_that_name_the_expression_and_line() {
        let err = render(
            "a: 1\nb: {{ row.plan }}\n",
            context! { row => context! { id => 1 } },
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "undefined variable row.plan (t.j2:2)");
    }

    #[test]
    fn required_fails_with_the_given_message() {
        let err = render(
            "{{ row.name | required('name is needed') }}",
            context! { row => context! { name => "" } },
        )
        .unwrap_err();
        assert!(err.message.contains("name is needed"), "{err}");
    }

    #[test]
    fn templates_cannot_include_files() {
        let err = render("{% include '/etc/passwd' %}", Value::UNDEFINED).unwrap_err();
        assert!(err.message.contains("not found"), "{err}");
    }
}
