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

use crate::api::RenderLimits;
use crate::printed::{self, Printed, Quoted, Structure};
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
    limits: RenderLimits,
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
    /// The template's line and a caret under where it failed, when known.
    pub excerpt: Option<String>,
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
    /// Compiles `(name, source)` pairs, each render bounded by `limits`; the
    /// first error of each template is returned with its name.
    pub fn compile(
        templates: Vec<(String, String)>,
        limits: &RenderLimits,
    ) -> Result<Self, Vec<(String, Failure)>> {
        let mut env = environment();
        // Fuel is counted per render: every object gets the whole budget.
        env.set_fuel(Some(limits.fuel()));
        let mut errors = Vec::new();
        for (name, source) in templates {
            if let Err(e) = env.add_template_owned(name.clone(), source.clone()) {
                errors.push((name, failure(&e, &source)));
            }
        }
        if errors.is_empty() {
            Ok(Self {
                env: Arc::new(env),
                limits: limits.clone(),
            })
        } else {
            Err(errors)
        }
    }

    /// Renders template `name` with `context`, within the limits. What the
    /// template printed is in the output as tokens (see [`crate::printed`]).
    pub fn render(&self, name: &str, context: &Value) -> Result<Output, Failure> {
        let template = self.env.get_template(name).map_err(|e| failure(&e, ""))?;
        let max = self.limits.max_object_bytes();
        let mut out = Bounded {
            text: Vec::new(),
            max: usize::try_from(max).unwrap_or(usize::MAX),
            exceeded: false,
        };
        let (result, printed) = printed::capture(out.max, || {
            template.render_captured_to(context, &mut out).map(|_| ())
        });
        match result {
            Ok(_) => {}
            Err(_) if out.exceeded || printed.exceeded() => {
                return Err(Failure {
                    message: format!(
                        "the template rendered more than {max} bytes for one object (raise spec.limits.maxObjectBytes or pass --max-object-bytes if that is meant)"
                    ),
                    location: Some(name.to_string()),
                    excerpt: None,
                });
            }
            Err(e) if e.kind() == ErrorKind::OutOfFuel => {
                return Err(Failure {
                    message: format!(
                        "the template took more than {} instructions for one object (a runaway loop? raise spec.limits.fuel or pass --fuel if that is meant)",
                        self.limits.fuel()
                    ),
                    location: failure(&e, template.source()).location,
                    excerpt: None,
                });
            }
            Err(e) => return Err(failure(&e, template.source())),
        }
        let text = String::from_utf8(out.text).map_err(|_| Failure {
            message: "the template rendered bytes that are not UTF-8".into(),
            location: Some(name.to_string()),
            excerpt: None,
        })?;
        Ok(Output { text, printed })
    }
}

/// What a template rendered: text in which every printed value is a token,
/// and the values the tokens stand for.
#[derive(Debug)]
pub struct Output {
    /// The rendered text, with tokens.
    pub text: String,
    /// What the tokens stand for.
    pub printed: Printed,
}

/// Template output that refuses to grow past `max` bytes, printed values
/// included.
struct Bounded {
    text: Vec<u8>,
    max: usize,
    exceeded: bool,
}

impl std::io::Write for Bounded {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        // Counted as the object will be, with printed values spelled out.
        if printed::spelled_len(self.text.len().saturating_add(bytes.len())) > self.max {
            self.exceeded = true;
            return Err(std::io::Error::other("output limit reached"));
        }
        self.text.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
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
    Failure {
        message,
        location,
        excerpt: excerpt(error, source),
    }
}

/// The failing line of `source` with a caret under the failing expression.
fn excerpt(error: &minijinja::Error, source: &str) -> Option<String> {
    let number = error.line()?;
    let line = source.lines().nth(number.checked_sub(1)?)?;
    let line_start = source
        .lines()
        .take(number - 1)
        .map(|l| l.len() + 1)
        .sum::<usize>();
    let (column, width) = match error.range() {
        Some(range) if range.start >= line_start && range.start <= line_start + line.len() => {
            let column = line[..range.start - line_start].chars().count();
            let end = range.end.min(line_start + line.len()).max(range.start);
            let width = source[range.start..end].chars().count().max(1);
            (column, width)
        }
        _ => (0, line.chars().count().max(1)),
    };
    let gutter = format!("{number} | ");
    Some(format!(
        "{gutter}{line}\n{:pad$}{}",
        "",
        "^".repeat(width),
        pad = gutter.len() + column
    ))
}

/// A compiled expression (a rollout wave's `select`, a condition gate):
/// the templates' filters and strict undefined, with the default fuel.
pub type Expression = minijinja::Expression<'static, 'static>;

/// Compiles `source` as an [`Expression`]; the error is one line.
pub fn expression(source: &str) -> Result<Expression, String> {
    static ENV: std::sync::LazyLock<Environment<'static>> = std::sync::LazyLock::new(|| {
        let mut env = environment();
        env.set_fuel(Some(RenderLimits::DEFAULT_FUEL));
        env
    });
    ENV.compile_expression_owned(source.to_string())
        .map_err(|e| one_line(&e))
}

/// A template error as one line: its kind and detail, or for an undefined
/// value, that.
pub fn one_line(error: &minijinja::Error) -> String {
    failure(error, "").message
}

fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    // Output is YAML, not HTML.
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
    // Printed values never become YAML syntax (see crate::printed); NULL
    // columns read back as YAML null, not the string "none".
    env.set_formatter(|out, _state, value| {
        out.write_str(&printed::format(value)?)
            .map_err(minijinja::Error::from)
    });
    env.add_filter("indent", indent);
    // HTML escaping has no place in YAML, and minijinja's marks its result
    // safe (printed as YAML text): here `escape` is plain text, printed as
    // every other string is.
    env.add_filter("escape", |v: String| v);
    env.add_filter("e", |v: String| v);
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

fn to_yaml(value: Value) -> Result<Value, minijinja::Error> {
    defined(&value)?;
    let structure = serde_json::to_value(&value).map_err(|e| invalid(format!("to_yaml: {e}")))?;
    let text = yaml::to_string(&structure).map_err(|e| invalid(format!("to_yaml: {e}")))?;
    let text = text.trim_end_matches('\n').to_string();
    Ok(Value::from_object(Structure::yaml(structure, text)))
}

fn to_json(value: Value) -> Result<Value, minijinja::Error> {
    defined(&value)?;
    let structure = serde_json::to_value(&value).map_err(|e| invalid(format!("to_json: {e}")))?;
    Ok(Value::from_object(Structure::json(structure)))
}

/// Jinja's `indent`: every line but the first (unless `first`) and blank
/// ones (unless `blank`) gets `width` spaces. A structure stays one: its
/// token stands for the whole of it wherever it is printed.
fn indent(
    value: Value,
    width: Option<usize>,
    first: Option<bool>,
    blank: Option<bool>,
) -> Result<Value, minijinja::Error> {
    let pad = " ".repeat(width.unwrap_or(4));
    let text = match value.downcast_object_ref::<Structure>() {
        Some(structure) => structure.text().to_string(),
        None => value.to_string(),
    };
    let mut out = String::with_capacity(text.len() + pad.len() * 8);
    for (i, line) in text.split('\n').enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let wanted = if i == 0 { first.unwrap_or(false) } else { true };
        if wanted && (!line.is_empty() || blank.unwrap_or(false)) {
            out.push_str(&pad);
        }
        out.push_str(line);
    }
    Ok(match value.downcast_object_ref::<Structure>() {
        Some(structure) => Value::from_object(structure.with_text(out)),
        None => Value::from(out),
    })
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

/// Strict undefined reaches a filter that takes any value: a misspelt
/// column must fail there as it does when printed.
fn defined(value: &Value) -> Result<(), minijinja::Error> {
    if value.is_undefined() {
        return Err(minijinja::Error::from(ErrorKind::UndefinedError));
    }
    Ok(())
}

/// One string, whatever it holds: printed, it is a YAML string with exactly
/// this text (JSON from `to_json` included); as text for other filters, it is
/// double-quoted as in JSON. None quotes as the empty string, as Helm's
/// `quote` does with nil.
fn quote(value: Value) -> Result<Value, minijinja::Error> {
    defined(&value)?;
    let text = match value.as_str() {
        Some(s) => s.to_string(),
        None if value.is_none() => String::new(),
        None => value.to_string(),
    };
    Ok(Value::from_object(Quoted::new(text)))
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

    /// The rendered text with every printed value spelled out.
    fn render(source: &str, ctx: Value) -> Result<String, Failure> {
        render_with(source, ctx, RenderLimits::default())
    }

    fn render_within(source: &str, limits: RenderLimits) -> Result<String, Failure> {
        render_with(source, Value::UNDEFINED, limits)
    }

    fn render_with(source: &str, ctx: Value, limits: RenderLimits) -> Result<String, Failure> {
        let t = Templates::compile(vec![("t.j2".into(), source.into())], &limits)
            .map_err(|mut e| e.remove(0).1)?;
        let output = t.render("t.j2", &ctx)?;
        Ok(output.printed.expand(&output.text).unwrap())
    }

    #[test]
    fn a_runaway_loop_runs_out_of_fuel_instead_of_hanging() {
        let err = render_within(
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            RenderLimits::default(),
        )
        .unwrap_err();
        assert!(
            err.message.contains("more than 10000000 instructions"),
            "{err}"
        );
        assert!(err.message.contains("spec.limits.fuel"), "{err}");
        // A budget that fits lets the same kind of loop finish.
        let fits = render_within(
            "{% for i in range(100) %}{% for j in range(100) %}{% endfor %}{% endfor %}ok",
            RenderLimits::default(),
        )
        .unwrap();
        assert_eq!(fits, "ok");
        let tight = render_within(
            "{% for i in range(100) %}{% endfor %}",
            RenderLimits {
                fuel: Some(10),
                ..RenderLimits::default()
            },
        )
        .unwrap_err();
        assert!(
            tight.message.contains("more than 10 instructions"),
            "{tight}"
        );
    }

    #[test]
    fn output_past_the_limit_is_refused_without_being_held() {
        let err = render_within(
            "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
            RenderLimits {
                fuel: Some(u64::MAX),
                ..RenderLimits::default()
            },
        )
        .unwrap_err();
        assert!(err.message.contains("more than 1048576 bytes"), "{err}");
        assert!(err.message.contains("spec.limits.maxObjectBytes"), "{err}");
        let small = render_within(
            "{{ 'x' * 11 }}",
            RenderLimits {
                max_object_bytes: Some(10),
                ..RenderLimits::default()
            },
        )
        .unwrap_err();
        assert!(small.message.contains("more than 10 bytes"), "{small}");
        assert_eq!(
            render_within(
                "{{ 'x' * 10 }}",
                RenderLimits {
                    max_object_bytes: Some(10),
                    ..RenderLimits::default()
                },
            )
            .unwrap(),
            "x".repeat(10)
        );
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
        // Printed, quote is the string itself; as text, it is JSON-quoted.
        assert_eq!(
            render("{{ 'say \"hi\"' | quote }}", ctx.clone()).unwrap(),
            r#"say "hi""#
        );
        assert_eq!(
            render("{{ ('say \"hi\"' | quote) ~ '!' }}", ctx.clone()).unwrap(),
            r#""say \"hi\""!"#
        );
        assert_eq!(render("{{ none | quote }}", ctx.clone()).unwrap(), "");
        assert_eq!(
            render("{{ row.tags | to_yaml | indent(2, true) }}", ctx.clone()).unwrap(),
            "- a\n- b"
        );
        assert_eq!(
            render("{{ 'a\nb\n\nc' | indent(2) }}", ctx.clone()).unwrap(),
            "a\n  b\n\n  c"
        );
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
