//! The render: every active row of each blueprint's source through its
//! templates, on every core, into canonical objects.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};

use minijinja::Value as Context;
use minijinja::context;
use serde_json::{Map, Value};

use crate::api::BlueprintSpec;
use crate::config::{Config, Named};
use crate::graph::{self, Graph};
use crate::manifest::{self, Identity, Scopes, Stamp};
use crate::memo::Memo;
use crate::policy::Policies;
use crate::source::Row;
use crate::template::{Failure, Output, Templates, dns_label};
use crate::{Error, Result, yaml};

/// One blueprint, compiled: its templates and dependency graph.
#[derive(Debug, Clone)]
pub struct Compiled {
    /// The blueprint's name.
    pub name: String,
    /// Its spec.
    pub spec: BlueprintSpec,
    templates: Templates,
    /// Template name of each resource, by index.
    template_names: Vec<String>,
    /// Dependency order and depths.
    pub graph: Graph,
    /// Each resource's policies as its objects carry them, by index.
    pub policies: Vec<Vec<(&'static str, String)>>,
    /// SHA-256 of the spec and every template's text: what a render commit
    /// records as the configuration it came from.
    pub digest: String,
    /// What it was compiled from.
    pub snapshot: std::sync::Arc<Snapshot>,
}

const NAMESPACE_TEMPLATE: &str = "(namespace)";

/// Compiles every blueprint (or the `selected` ones); reports all problems.
pub fn compile(config: &Config, selected: &[String]) -> Result<Vec<Compiled>> {
    let mut compiled = Vec::new();
    let mut errors = Vec::new();
    for blueprint in config.blueprints.values() {
        if !selected.is_empty() && !selected.contains(&blueprint.name) {
            continue;
        }
        match compile_one(blueprint) {
            Ok(c) => compiled.push(c),
            Err(e) => errors.extend(e),
        }
    }
    Error::all(errors)?;
    Ok(compiled)
}

fn compile_one(blueprint: &Named<BlueprintSpec>) -> Result<Compiled, Vec<Error>> {
    let name = &blueprint.name;
    let at = |message: String| {
        Error::config(
            blueprint.file.display(),
            format!("Blueprint {name}: {message}"),
        )
    };
    let mut errors = Vec::new();
    let mut sources = Vec::new();
    let mut template_names = Vec::new();
    if let Some(namespace) = &blueprint.spec.namespace {
        sources.push((NAMESPACE_TEMPLATE.to_string(), namespace.clone()));
    }
    for resource in &blueprint.spec.resources {
        let (template_name, text) = match (&resource.template, &resource.template_file) {
            (_, Some(file)) => match std::fs::read_to_string(blueprint.resolve(file)) {
                Ok(text) => (file.clone(), text),
                Err(e) => {
                    errors.push(at(format!(
                        "resource {}: cannot read templateFile {}: {e}",
                        resource.id,
                        blueprint.resolve(file).display()
                    )));
                    continue;
                }
            },
            (Some(text), None) => (format!("{name}/{} (inline)", resource.id), text.clone()),
            (None, None) => continue,
        };
        template_names.push(template_name.clone());
        sources.push((template_name, text));
    }
    let snapshot = Snapshot {
        name: name.clone(),
        spec: blueprint.spec.clone(),
        sources,
        template_names,
    };
    match snapshot.build(&at) {
        Ok(compiled) if errors.is_empty() => Ok(compiled),
        Ok(_) => Err(errors),
        Err(more) => {
            errors.extend(more);
            Err(errors)
        }
    }
}

/// A blueprint with every template's text: what compiles to the same
/// [`Compiled`] (same digest, same output) without its files, so that a
/// rollout can keep rendering the revision it replaces.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    /// The blueprint's name.
    pub name: String,
    /// Its spec.
    pub spec: BlueprintSpec,
    /// Every template, by name, in the order they compile.
    sources: Vec<(String, String)>,
    /// Template name of each resource that has one, by index.
    template_names: Vec<String>,
}

impl Snapshot {
    /// Compiles it; `origin` names where it was kept, for messages.
    pub fn compile(&self, origin: &str) -> Result<Compiled> {
        let at =
            |message: String| Error::config(origin, format!("Blueprint {}: {message}", self.name));
        self.build(&at).map_err(|errors| {
            Error::all(errors)
                .err()
                .unwrap_or_else(|| at("does not compile".into()))
        })
    }

    /// SHA-256 of the spec and every template's text ([`Compiled::digest`]).
    pub fn digest(&self) -> String {
        use sha2::Digest as _;
        let mut hasher = sha2::Sha256::new();
        hasher.update(serde_json::to_vec(&self.spec).unwrap_or_default());
        for (name, text) in &self.sources {
            hasher.update([0]);
            hasher.update(name.as_bytes());
            hasher.update([0]);
            hasher.update(text.as_bytes());
        }
        crate::template::hex(&hasher.finalize())
    }

    fn build(&self, at: &dyn Fn(String) -> Error) -> Result<Compiled, Vec<Error>> {
        let mut errors = Vec::new();
        let digest = self.digest();
        let mut policies = Vec::with_capacity(self.spec.resources.len());
        for resource in &self.spec.resources {
            match Policies::of(resource) {
                Ok(p) => policies.push(p.annotations()),
                Err(e) => errors.push(at(format!("resource {}: {e}", resource.id))),
            }
        }
        let graph = graph::build(&self.spec.resources)
            .map_err(|e| e.into_iter().map(at).collect::<Vec<_>>());
        let limits = self.spec.limits.clone().unwrap_or_default();
        let templates = Templates::compile(self.sources.clone(), &limits).map_err(|failures| {
            failures
                .into_iter()
                .map(|(template, failure)| {
                    let mut error = at(format!("template {template} does not compile: {failure}"));
                    if let Error::Config { excerpt, .. } = &mut error {
                        *excerpt = failure.excerpt;
                    }
                    error
                })
                .collect::<Vec<_>>()
        });
        match (graph, templates) {
            (Ok(graph), Ok(templates)) if errors.is_empty() => Ok(Compiled {
                digest,
                name: self.name.clone(),
                spec: self.spec.clone(),
                templates,
                template_names: self.template_names.clone(),
                graph,
                policies,
                snapshot: std::sync::Arc::new(self.clone()),
            }),
            (graph, templates) => {
                errors.extend(graph.err().unwrap_or_default());
                errors.extend(templates.err().unwrap_or_default());
                Err(errors)
            }
        }
    }
}

/// A rendered object.
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    /// The resource id that rendered it.
    pub resource: String,
    /// What identifies it in a cluster.
    pub identity: Identity,
    /// The canonical object as YAML: what is written and committed.
    pub yaml: String,
    /// Whether it is a Secret carrying `data` or `stringData`.
    pub plaintext_secret: bool,
}

impl Object {
    /// The object as a value, parsed back from its YAML.
    pub fn value(&self) -> Result<Value> {
        yaml::from_str(&self.yaml, &format!("{}", self.identity))
    }
}

/// One row of one blueprint, rendered.
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    /// The blueprint.
    pub blueprint: String,
    /// The row key.
    pub key: String,
    /// The key made a DNS label: the instance directory.
    pub name: String,
    /// Objects in dependency order; resources that rendered nothing are
    /// absent. Empty for an instance taken from the memo.
    pub objects: Vec<Object>,
    /// What the memo keeps of it, in a render with a memo: `None` when it
    /// may not be remembered (see [`crate::memo`]).
    pub remembered: Option<Remembered>,
}

impl Instance {
    /// The tree its directory already is in the repository, when it was
    /// taken from the memo instead of rendered (then it has no objects).
    pub fn stored(&self) -> Option<git2::Oid> {
        self.remembered.as_ref().and_then(|r| r.tree)
    }
}

/// An instance as the memo knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remembered {
    /// The digest of what its render reads.
    pub key: crate::memo::Key,
    /// Bytes of template output it spent.
    pub bytes: u64,
    /// The identity hash of each of its objects.
    pub identities: Vec<u64>,
    /// Its directory's tree, when it was taken from the memo.
    pub tree: Option<git2::Oid>,
}

/// Everything one render produced.
#[derive(Debug, Clone, Default)]
pub struct Rendered {
    /// Blueprints rendered, sorted, including those with no instance.
    pub blueprints: Vec<String>,
    /// Instances sorted by blueprint, then name.
    pub instances: Vec<Instance>,
    /// The CRD scopes it was rendered with, in a render with a memo.
    pub scopes: Option<Scopes>,
}

/// What a blueprint's objects may take in one render, and what they took.
struct Budget {
    spent: AtomicU64,
    limit: u64,
}

impl Budget {
    /// Counts `bytes` of output; false once the render is over budget.
    fn spend(&self, bytes: usize) -> bool {
        let bytes = bytes as u64;
        self.spent.fetch_add(bytes, Ordering::Relaxed) + bytes <= self.limit
    }

    fn exhausted(&self) -> bool {
        self.spent.load(Ordering::Relaxed) > self.limit
    }
}

/// One row's objects, stamped and serialised.
struct Stamped {
    blueprint: usize,
    key: String,
    name: String,
    objects: Vec<Object>,
    remembered: Option<Remembered>,
}

/// The rows rendered, the CRDs seen, the errors, and whether a budget was
/// passed.
type Pass = (Vec<Stamped>, Vec<Map<String, Value>>, Vec<Error>, bool);

/// Renders every active row once with `scopes` (taking what `memo` holds);
/// returns the rows, the CRDs seen, and the errors (or the first, with
/// `stop_at_first`).
fn render_pass(
    blueprints: &[Compiled],
    config: &Config,
    rows: &BTreeMap<String, Vec<Row>>,
    stop_at_first: bool,
    scopes: &Scopes,
    memo: Option<&Memo>,
    take: Option<Take<'_>>,
) -> Result<Pass> {
    let mut stamped = Vec::new();
    let mut crds = Vec::new();
    let mut errors = Vec::new();
    let mut over_budget = false;
    let scopes_key = memo.map(|_| crate::memo::scopes_digest(scopes));
    let memo = memo.zip(scopes_key.as_ref());
    let total: usize = blueprints
        .iter()
        .filter_map(|b| rows.get(&b.spec.source))
        .map(|r| r.iter().filter(|r| r.active).count())
        .sum();
    let progress = crate::progress::phase("rendering instances", total as u64);
    for (b, blueprint) in blueprints.iter().enumerate() {
        let active: Vec<&Row> = rows
            .get(&blueprint.spec.source)
            .map(|r| r.iter().filter(|r| r.active).collect())
            .unwrap_or_default();
        let budget = Budget {
            spent: AtomicU64::new(0),
            limit: blueprint
                .spec
                .limits
                .clone()
                .unwrap_or_default()
                .max_render_bytes(),
        };
        let results = crate::parallel::map(active, |row| {
            let rendered = render_row(b, blueprint, config, row, scopes, &budget, memo).map(
                |(mut stamped, crds)| {
                    if let Some(take) = take {
                        take(&blueprint.name, &stamped.name, &mut stamped.objects);
                    }
                    (stamped, crds)
                },
            );
            progress.advance(1);
            rendered
        });
        for result in results {
            match result {
                Ok((row, found)) => {
                    stamped.push(row);
                    crds.extend(found);
                }
                Err(e) if stop_at_first => return Err(e),
                Err(e) => errors.push(e),
            }
        }
        over_budget |= budget.exhausted();
    }
    Ok((stamped, crds, errors, over_budget))
}

/// Renders every active row; `stop_at_first` makes the first error (in
/// blueprint and row order) the only one, else all are returned.
pub fn render(
    blueprints: &[Compiled],
    config: &Config,
    rows: &BTreeMap<String, Vec<Row>>,
    stop_at_first: bool,
) -> Result<Rendered> {
    render_remembering(blueprints, config, rows, stop_at_first, None)
}

/// [`render`], taking from `memo` every instance whose inputs it holds (see
/// [`crate::memo`]): those come out with no objects and the tree their
/// directory is ([`Instance::stored`]). With a memo, every instance that
/// may be remembered says what to remember of it.
pub fn render_remembering(
    blueprints: &[Compiled],
    config: &Config,
    rows: &BTreeMap<String, Vec<Row>>,
    stop_at_first: bool,
    memo: Option<&Memo>,
) -> Result<Rendered> {
    render_inner(blueprints, config, rows, stop_at_first, memo, None)
}

/// Hands each instance's objects over as it renders (see
/// [`render_taking`]): blueprint, instance and objects.
pub type Take<'a> = &'a (dyn Fn(&str, &str, &mut [Object]) + Sync);

/// [`render`], handing each instance's objects to `take` on the thread that
/// rendered them, as soon as they are: a caller that turns them into its
/// own form and lets go of their YAML never holds the whole fleet's YAML,
/// and the thread reuses what was let go of for the next instance. What
/// `take` leaves of each object is what the render returns. An instance
/// may be handed over twice (a second pass when CRDs of the render change
/// scopes); the last is the one that counts.
pub fn render_taking(
    blueprints: &[Compiled],
    config: &Config,
    rows: &BTreeMap<String, Vec<Row>>,
    stop_at_first: bool,
    take: Take<'_>,
) -> Result<Rendered> {
    render_inner(blueprints, config, rows, stop_at_first, None, Some(take))
}

fn render_inner(
    blueprints: &[Compiled],
    config: &Config,
    rows: &BTreeMap<String, Vec<Row>>,
    stop_at_first: bool,
    memo: Option<&Memo>,
    take: Option<Take<'_>>,
) -> Result<Rendered> {
    // One pass stamps and serialises each object as it renders, so no
    // parsed object outlives its row. CRDs rendered in the same run can make
    // their kinds cluster-scoped; only then is a second pass needed. The
    // memo's scopes are the first guess: they are the last render's, and
    // an instance that renders a CRD is never taken from the memo, so the
    // CRDs of this pass are all there are.
    let defaults = Scopes::default();
    let first = memo.and_then(|m| m.scopes.clone()).unwrap_or_default();
    let (mut stamped, crds, mut errors, mut over_budget) =
        render_pass(blueprints, config, rows, stop_at_first, &first, memo, take)?;
    let mut learned = defaults.clone();
    for crd in &crds {
        learned.learn(crd);
    }
    if learned != first {
        (stamped, _, errors, over_budget) = render_pass(
            blueprints,
            config,
            rows,
            stop_at_first,
            &learned,
            memo,
            take,
        )?;
    }
    let reused = stamped
        .iter()
        .any(|s| s.remembered.as_ref().is_some_and(|r| r.tree.is_some()));
    // What a render that reused an instance reports must be what a full
    // render reports: any trouble, and it is done again without the memo.
    if reused && (over_budget || !errors.is_empty() || identities_collide(&stamped)) {
        tracing::debug!("the render with the memo found a problem; rendering every instance");
        let empty = Memo::default();
        return render_inner(blueprints, config, rows, stop_at_first, Some(&empty), take);
    }

    let mut instances = Vec::with_capacity(stamped.len());
    // Where each instance was among the rows, so that every error comes
    // in row order.
    let mut at = Vec::with_capacity(stamped.len());
    let mut found: Vec<(usize, Error)> = Vec::new();
    let mut names: HashMap<(usize, String), String> = HashMap::new();
    for (
        i,
        Stamped {
            blueprint: b,
            key,
            name,
            objects,
            remembered,
        },
    ) in stamped.into_iter().enumerate()
    {
        let blueprint = &blueprints[b];
        if let Some(other) = names.insert((b, name.clone()), key.clone()) {
            let collision = Error::InstanceCollision {
                blueprint: blueprint.name.clone(),
                first: other,
                second: key.clone(),
                instance: name.clone(),
            };
            found.push((i, collision));
            continue;
        }
        at.push(i);
        instances.push(Instance {
            blueprint: blueprint.name.clone(),
            key,
            name,
            objects,
            remembered,
        });
    }
    found.extend(
        duplicates(&instances)
            .into_iter()
            .map(|(instance, error)| (at[instance], error)),
    );
    // Stable: an instance's duplicates stay in the order of its objects.
    found.sort_by_key(|(i, _)| *i);
    errors.extend(found.into_iter().map(|(_, e)| e));
    if stop_at_first && !errors.is_empty() {
        return Err(errors.remove(0));
    }
    Error::all(errors)?;
    instances.sort_by(|a, b| (&a.blueprint, &a.name).cmp(&(&b.blueprint, &b.name)));
    let mut names: Vec<String> = blueprints.iter().map(|b| b.name.clone()).collect();
    names.sort();
    Ok(Rendered {
        blueprints: names,
        instances,
        scopes: memo.map(|_| learned),
    })
}

/// The objects `instances` render twice, each named with the one before
/// it of the same identity, by the index of the instance of the second, in
/// the order of the instances and their objects. (Sorted references, not a
/// table of copied identities: a render of 100,000 objects would hold
/// 100,000 more.)
fn duplicates(instances: &[Instance]) -> Vec<(usize, Error)> {
    let mut all: Vec<(&Identity, u32, u32)> = instances
        .iter()
        .enumerate()
        .flat_map(|(i, instance)| {
            instance
                .objects
                .iter()
                .enumerate()
                .map(move |(o, object)| (&object.identity, i as u32, o as u32))
        })
        .collect();
    all.sort_unstable();
    let owner = |(_, i, o): (&Identity, u32, u32)| {
        let instance = &instances[i as usize];
        format!(
            "blueprint {}, row {}, resource {}",
            instance.blueprint, instance.key, instance.objects[o as usize].resource
        )
    };
    let mut found: Vec<(u32, u32, Error)> = all
        .windows(2)
        .filter(|pair| pair[0].0 == pair[1].0)
        .map(|pair| {
            let error = Error::DuplicateObject {
                object: pair[1].0.to_string(),
                first: owner(pair[0]),
                second: owner(pair[1]),
            };
            (pair[1].1, pair[1].2, error)
        })
        .collect();
    found.sort_by_key(|(i, o, _)| (*i, *o));
    found
        .into_iter()
        .map(|(i, _, error)| (i as usize, error))
        .collect()
}

/// Whether two objects of a render with reused instances have the same
/// identity hash: then it must be rendered in full to tell (and name) a
/// real collision.
fn identities_collide(stamped: &[Stamped]) -> bool {
    let mut seen = std::collections::HashSet::new();
    for row in stamped {
        let fresh;
        let hashes = match &row.remembered {
            Some(r) => &r.identities,
            None => {
                fresh = row
                    .objects
                    .iter()
                    .map(|o| crate::memo::identity_hash(&o.identity))
                    .collect::<Vec<_>>();
                &fresh
            }
        };
        if hashes.iter().any(|h| !seen.insert(*h)) {
            return true;
        }
    }
    false
}

fn render_row(
    b: usize,
    blueprint: &Compiled,
    config: &Config,
    row: &Row,
    scopes: &Scopes,
    budget: &Budget,
    memo: Option<(&Memo, &crate::memo::Key)>,
) -> Result<(Stamped, Vec<Map<String, Value>>)> {
    let name = dns_label(&row.key);
    let memo_key = memo.map(|(_, scopes)| crate::memo::instance_key(blueprint, scopes, row));
    if let Some(((memo, _), key)) = memo.zip(memo_key)
        && let Some(entry) = memo.get(&key)
    {
        budget.spend(usize::try_from(entry.bytes).unwrap_or(usize::MAX));
        let stamped = Stamped {
            blueprint: b,
            key: row.key.clone(),
            name,
            objects: Vec::new(),
            remembered: Some(Remembered {
                key,
                bytes: entry.bytes,
                identities: entry.identities.clone(),
                tree: Some(entry.tree),
            }),
        };
        return Ok((stamped, Vec::new()));
    }
    if budget.exhausted() {
        // The row that went over budget reports it; the rest stop here.
        let stamped = Stamped {
            blueprint: b,
            key: row.key.clone(),
            name,
            objects: Vec::new(),
            remembered: None,
        };
        return Ok((stamped, Vec::new()));
    }
    let fail = |resource: &str, template: &str, failure: Failure| {
        let location = failure
            .location
            .clone()
            .unwrap_or_else(|| template.to_string());
        Error::TemplateFailed {
            blueprint: blueprint.name.clone(),
            resource: resource.to_string(),
            key: row.key.clone(),
            message: format!("{} ({location})", failure.message),
            excerpt: failure.excerpt,
        }
    };
    let source = config
        .sources
        .get(&blueprint.spec.source)
        .map(|s| s.name.as_str())
        .unwrap_or_default();
    let row_value = Context::from(minijinja::value::Serde(&row.values));
    let namespace = match blueprint.spec.namespace {
        Some(_) => {
            let ctx = context! { row => row_value.clone(), key => &row.key, blueprint => &blueprint.name, source => source };
            let output = blueprint
                .templates
                .render(NAMESPACE_TEMPLATE, &ctx)
                .map_err(|f| fail("(namespace)", "spec.namespace", f))?;
            let text = output.printed.expand(&output.text).map_err(|message| {
                fail(
                    "(namespace)",
                    "spec.namespace",
                    Failure {
                        message,
                        location: None,
                        excerpt: None,
                    },
                )
            })?;
            Some(text.trim().to_string()).filter(|n| !n.is_empty())
        }
        None => None,
    };
    if let Some(ns) = namespace.as_deref()
        && !crate::template::is_dns_label(ns)
    {
        return Err(fail(
            "(namespace)",
            "spec.namespace",
            Failure {
                message: format!(
                    "the namespace {ns:?} is not a DNS label (lowercase letters, digits and '-', at most 63; the dns_label filter makes one)"
                ),
                location: None,
                excerpt: None,
            },
        ));
    }
    let ctx = context! {
        row => row_value,
        key => &row.key,
        blueprint => &blueprint.name,
        source => source,
        namespace => &namespace,
    };
    // At most one object per resource, so no doubling's spare room is held
    // until the render is done.
    let mut objects = Vec::with_capacity(blueprint.spec.resources.len());
    let mut crds = Vec::new();
    let mut spent = 0u64;
    // What each resource depends on among those that rendered something
    // for this row: a dependency that rendered nothing passes on its own
    // dependencies, so the order of what remains is kept (as ArgoCD's
    // sync waves keep it).
    let mut effective: HashMap<&str, Vec<&str>> = HashMap::new();
    let mut rendered_ids: std::collections::HashSet<&str> = std::collections::HashSet::new();
    let mut empty = Vec::new();
    for &r in &blueprint.graph.order {
        let resource = &blueprint.spec.resources[r];
        let mut deps: Vec<&str> = Vec::new();
        for d in &resource.depends_on {
            let inherited: Vec<&str> = if rendered_ids.contains(d.as_str()) {
                vec![d.as_str()]
            } else {
                effective.get(d.as_str()).cloned().unwrap_or_default()
            };
            for i in inherited {
                if !deps.contains(&i) {
                    deps.push(i);
                }
            }
        }
        effective.insert(resource.id.as_str(), deps);
        let template = &blueprint.template_names[r];
        let output = blueprint
            .templates
            .render(template, &ctx)
            .map_err(|f| fail(&resource.id, template, f))?;
        spent += output.text.len() as u64;
        if !budget.spend(output.text.len()) {
            return Err(fail(
                &resource.id,
                template,
                Failure {
                    message: format!(
                        "the blueprint's objects passed {} bytes in this render (raise spec.limits.maxRenderBytes or pass --max-render-bytes if that is meant)",
                        budget.limit
                    ),
                    location: None,
                    excerpt: None,
                },
            ));
        }
        if output.text.trim().is_empty() {
            empty.push(resource.id.as_str());
            continue;
        }
        rendered_ids.insert(resource.id.as_str());
        let mut object = parse_object(&output).map_err(|message| {
            fail(
                &resource.id,
                template,
                Failure {
                    message,
                    location: Some(template.clone()),
                    excerpt: None,
                },
            )
        })?;
        if manifest::is_crd(&object) {
            crds.push(object.clone());
        }
        let passed_on = resource
            .depends_on
            .iter()
            .any(|d| empty.contains(&d.as_str()));
        let policies = if passed_on {
            std::borrow::Cow::Owned(with_dependencies(
                &blueprint.policies[r],
                &effective[resource.id.as_str()],
            ))
        } else {
            std::borrow::Cow::Borrowed(&blueprint.policies[r])
        };
        let identity = manifest::stamp(
            &mut object,
            &Stamp {
                blueprint: &blueprint.name,
                instance: &name,
                resource: &resource.id,
                wave: blueprint.graph.depth[r],
                namespace: namespace.as_deref(),
                cluster_scoped: resource.cluster_scoped,
                policies: &policies,
            },
            scopes,
        );
        let value = Value::Object(object);
        let plaintext_secret = manifest::is_secret(&value)
            && ["data", "stringData"]
                .iter()
                .any(|f| value[f].as_object().is_some_and(|m| !m.is_empty()));
        objects.push(Object {
            resource: resource.id.clone(),
            identity,
            yaml: yaml::value_to_string(&value)?,
            plaintext_secret,
        });
    }
    // An instance with a CRD (its scope reaches other instances) or a
    // Secret in plain text (the guard must name it) renders every time.
    let remembered = memo_key
        .filter(|_| crds.is_empty() && !objects.iter().any(|o| o.plaintext_secret))
        .map(|key| Remembered {
            key,
            bytes: spent,
            identities: objects
                .iter()
                .map(|o| crate::memo::identity_hash(&o.identity))
                .collect(),
            tree: None,
        });
    Ok((
        Stamped {
            blueprint: b,
            key: row.key.clone(),
            name,
            objects,
            remembered,
        },
        crds,
    ))
}

/// A resource's policy annotations with `depends_on` in place of the
/// dependencies it was compiled with.
fn with_dependencies(
    policies: &[(&'static str, String)],
    depends_on: &[&str],
) -> Vec<(&'static str, String)> {
    let mut out: Vec<(&'static str, String)> = policies
        .iter()
        .filter(|(k, _)| *k != crate::policy::DEPENDS_ON)
        .cloned()
        .collect();
    if !depends_on.is_empty() {
        out.insert(0, (crate::policy::DEPENDS_ON, depends_on.join(",")));
    }
    out
}

/// Parses a template's output as exactly one Kubernetes object, then puts
/// back what the template printed (see [`crate::printed`]): the structure is
/// the template's alone.
fn parse_object(output: &Output) -> std::result::Result<Map<String, Value>, String> {
    let mut object = parse_document(&output.text)?;
    output.printed.resolve(&mut object)?;
    let Value::Object(object) = object else {
        return Err(format!(
            "rendered {}, not a mapping with apiVersion, kind and metadata.name",
            kind_of(&object)
        ));
    };
    for field in ["apiVersion", "kind"] {
        if object
            .get(field)
            .is_none_or(|v| v.as_str().is_none_or(str::is_empty))
        {
            return Err(format!("the rendered object has no {field}"));
        }
    }
    let kind = object["kind"].as_str().unwrap_or_default();
    if kind.ends_with("List") || object.contains_key("items") {
        // A container would carry objects past every check made on one:
        // its items get no labels, no namespace, no Secret guard.
        return Err(format!(
            "the rendered object is a {kind}: a resource renders one object, never a list of them (give each its own resource)"
        ));
    }
    let metadata = object.get("metadata");
    let name = metadata.and_then(|m| m.get("name")).and_then(Value::as_str);
    let Some(name) = name.filter(|n| !n.is_empty()) else {
        return Err("the rendered object has no metadata.name".into());
    };
    if let Some(why) = invalid_name(name) {
        return Err(format!("metadata.name {name:?} {why}"));
    }
    if let Some(namespace) = metadata.and_then(|m| m.get("namespace")) {
        match namespace.as_str() {
            Some(ns) if crate::template::is_dns_label(ns) => {}
            _ => {
                return Err(format!(
                    "metadata.namespace {namespace} is not a DNS label (lowercase letters, digits and '-', at most 63)"
                ));
            }
        }
    }
    Ok(object)
}

/// Parses a template's output as one YAML document.
///
/// What a row prints is a token in the output (see [`crate::printed`]), so a
/// template renders the same text for most rows: each thread remembers the
/// documents it parsed by their text, and a text seen before costs a hash
/// and a copy instead of a parse. Parsing is a function of the text alone,
/// so a remembered document is the one a parse would give.
fn parse_document(text: &str) -> std::result::Result<Value, String> {
    /// Documents one thread remembers at most; past that it starts over.
    const REMEMBERED: usize = 512;
    thread_local! {
        static PARSED: std::cell::RefCell<HashMap<String, Value>> =
            std::cell::RefCell::new(HashMap::new());
    }
    if let Some(found) = PARSED.with(|p| p.borrow().get(text).cloned()) {
        return Ok(found);
    }
    let mut documents: Vec<Value> =
        yaml::from_rendered(text, "the output").map_err(|e| e.to_string())?;
    documents.retain(|d| !d.is_null());
    let document = match documents.len() {
        1 => documents.remove(0),
        n => {
            return Err(format!(
                "rendered {n} YAML documents; a resource renders exactly one object or nothing"
            ));
        }
    };
    PARSED.with(|p| {
        let mut parsed = p.borrow_mut();
        if parsed.len() >= REMEMBERED {
            parsed.clear();
        }
        parsed.insert(text.to_string(), document.clone());
    });
    Ok(document)
}

/// Why `name` cannot name an object, if it cannot: the API server takes it as
/// a path segment, and Kiln as part of file names and inventory lines.
fn invalid_name(name: &str) -> Option<&'static str> {
    if name.len() > 253 {
        Some("is longer than 253 characters")
    } else if name.contains('/') || name.contains('%') {
        Some("contains '/' or '%'")
    } else if name.contains("..") || name == "." {
        Some("contains '..' or is '.'")
    } else if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Some("contains white space or a control character")
    } else {
        None
    }
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

/// Reads the sources the `blueprints` need, concurrently, each once; at most
/// `limit` rows each. `objects` lists what `kubernetes` sources read.
pub async fn read_sources(
    blueprints: &[Compiled],
    config: &Config,
    limit: Option<usize>,
    objects: Option<&dyn crate::source::Objects>,
) -> Result<BTreeMap<String, Vec<Row>>> {
    let names: std::collections::BTreeSet<&str> =
        blueprints.iter().map(|b| b.spec.source.as_str()).collect();
    let progress = crate::progress::phase("reading sources", names.len() as u64);
    let progress = &progress;
    let reads = names
        .into_iter()
        .filter_map(|name| config.sources.get(name))
        .map(|source| async move {
            let read = crate::source::read(source, limit, objects)
                .await
                .map(|rows| (source.name.clone(), rows));
            progress.advance(1);
            read
        });
    let results = futures_util::future::join_all(reads).await;
    let mut rows = BTreeMap::new();
    let mut errors = Vec::new();
    for result in results {
        match result {
            Ok((name, r)) => {
                rows.insert(name, r);
            }
            Err(e) => errors.push(e),
        }
    }
    Error::all(errors)?;
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(key: &str, names: &[&str]) -> Instance {
        Instance {
            blueprint: "web".into(),
            key: key.into(),
            name: key.into(),
            objects: names
                .iter()
                .map(|name| Object {
                    resource: format!("r-{name}"),
                    identity: Identity {
                        group: "".into(),
                        kind: "ConfigMap".into(),
                        namespace: "shared".into(),
                        name: (*name).into(),
                    },
                    yaml: String::new(),
                    plaintext_secret: false,
                })
                .collect(),
            remembered: None,
        }
    }

    #[test]
    fn each_duplicate_is_named_with_the_one_before_it_in_row_order() {
        let instances = [
            instance("a", &["x", "y"]),
            instance("b", &["z", "y"]),
            instance("c", &["y", "x"]),
        ];
        let found: Vec<(usize, String)> = duplicates(&instances)
            .into_iter()
            .map(|(i, e)| (i, e.to_string()))
            .collect();
        let said = |object: &str, first: &str, second: &str| {
            format!(
                "ConfigMap shared/{object} is rendered twice: by blueprint web, {first} and by blueprint web, {second}"
            )
        };
        assert_eq!(
            found,
            [
                (1, said("y", "row a, resource r-y", "row b, resource r-y")),
                (2, said("y", "row b, resource r-y", "row c, resource r-y")),
                (2, said("x", "row a, resource r-x", "row c, resource r-x")),
            ]
        );
        assert!(duplicates(&instances[..1]).is_empty());
    }
}
