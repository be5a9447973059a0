//! The configuration kinds, `kiln.dev/v1alpha1`: one Rust type per kind,
//! read from YAML files by the CLI and from the cluster by the controller. The
//! CRDs in `crds/` are generated from these types (`kiln crds`).

use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group and version of every Kiln kind.
pub const API_VERSION: &str = "kiln.dev/v1alpha1";

/// Where rows come from: a SQL query or a file, and which column identifies a row.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "kiln.dev",
    version = "v1alpha1",
    kind = "Source",
    namespaced,
    doc = "A datasource whose rows Kiln renders",
    printcolumn = r#"{"name":"Key","type":"string","jsonPath":".spec.key"}"#,
    printcolumn = r#"{"name":"Interval","type":"string","jsonPath":".spec.interval"}"#
)]
#[x_kube(validation = Rule::new("[has(self.url), has(self.urlFrom), has(self.kubernetes)].filter(x, x).size() == 1").message("exactly one of url, urlFrom and kubernetes must be set"))]
#[x_kube(validation = Rule::new("has(self.kubernetes) || (has(self.key) && self.key != '')").message("key must name a column"))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SourceSpec {
    /// Connection URL; the scheme picks the driver: `sqlite:`, `postgres:` or
    /// `postgresql:`, `mysql:` or `mariadb:`, `file:` (CSV, JSON or YAML by
    /// extension). Relative paths resolve against the configuration file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Where to read the URL from instead, so that passwords stay out of the
    /// configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_from: Option<UrlFrom>,
    /// Kubernetes objects as rows, one per object, instead of a URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<ObjectsSpec>,
    /// The SQL query (SQL drivers only; a file source reads the whole file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    /// The column that identifies a row; duplicate and NULL keys are errors.
    /// For Kubernetes objects a dotted path such as `spec.tenantId`,
    /// default `namespace/name` (`name` for cluster-scoped objects).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub key: String,
    /// Optional column: a row renders only when it is truthy (true, 1, yes,
    /// on, case-insensitive). A dotted path for Kubernetes objects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active: Option<String>,
    /// How often the sync loop polls the source, e.g. `30s`, `5m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^([0-9]+([.][0-9]+)?(ns|us|ms|s|m|h))+$') && duration(self) >= duration('1s')").message("interval must be a duration of at least 1s, such as 30s, 5m or 1h30m"))]
    #[schemars(length(max = 32))]
    pub interval: Option<String>,
    /// How long a query may take, e.g. `30s` (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^([0-9]+([.][0-9]+)?(ns|us|ms|s|m|h))+$') && duration(self) > duration('0s')").message("timeout must be a positive duration such as 30s, 5m or 1h"))]
    #[schemars(length(max = 32))]
    pub timeout: Option<String>,
    /// SQLite only: a SQL file that creates the database when the file does
    /// not exist yet (demos, tests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed_file: Option<String>,
    /// PostgreSQL only: a channel to `LISTEN` on. A notification on it
    /// reads the source at once; polling at `interval` stays the safety
    /// net.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<NotifySpec>,
}

/// Where a PostgreSQL source is told that its rows changed.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NotifySpec {
    /// The channel a trigger sends `NOTIFY` (or `pg_notify`) on.
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z_][A-Za-z0-9_]*$')").message("notify.channel must be a PostgreSQL identifier: letters, digits and '_', not starting with a digit"))]
    #[schemars(length(min = 1, max = 63))]
    pub channel: String,
}

/// Which Kubernetes objects a Source reads: each is a row whose values are
/// the object (`row.metadata.labels`, `row.spec.plan`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectsSpec {
    /// The objects' `apiVersion`, e.g. `example.com/v1`.
    #[x_kube(validation = Rule::new("self != ''").message("apiVersion is required"))]
    pub api_version: String,
    /// Their kind, e.g. `Tenant`.
    #[x_kube(validation = Rule::new("self != ''").message("kind is required"))]
    pub kind: String,
    /// Only this namespace (default: every namespace; in the controller, the
    /// Source's own and no other).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Only objects with these labels, e.g. `tier=gold,!legacy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_selector: Option<String>,
    /// Only objects with these fields, e.g. `metadata.name!=test`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field_selector: Option<String>,
    /// Write a `Ready` condition and Kiln's object counts into each row
    /// object's status after every apply (its kind needs a status
    /// subresource), so that `kubectl get` on the kind shows each row's
    /// health.
    #[serde(default, skip_serializing_if = "is_default")]
    pub write_status: bool,
}

/// Indirect sources of a Source's URL.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("has(self.env) != has(self.secretKeyRef)").message("exactly one of env and secretKeyRef must be set"))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UrlFrom {
    /// An environment variable of the process running Kiln.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
    /// A key of a Secret in the Source's namespace (controller only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key_ref: Option<SecretKeyRef>,
}

/// A key of a Secret.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretKeyRef {
    /// The Secret's name.
    pub name: String,
    /// The key inside the Secret's data.
    pub key: String,
}

/// Where a template is kept instead of inline.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TemplateFrom {
    /// A key of a ConfigMap in the Blueprint's namespace.
    pub config_map_key_ref: KeyRef,
}

/// A key of a ConfigMap.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KeyRef {
    /// The ConfigMap's name.
    pub name: String,
    /// The key inside its data.
    pub key: String,
}

/// A set of templates rendered once per active row of a source.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "kiln.dev",
    version = "v1alpha1",
    kind = "Blueprint",
    namespaced,
    doc = "Templates rendered once per active row of a Source",
    printcolumn = r#"{"name":"Source","type":"string","jsonPath":".spec.source"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BlueprintSpec {
    /// The name of the Source whose rows this blueprint renders.
    pub source: String,
    /// Default namespace of namespaced objects that set none (a template).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The objects rendered for each row; ids are unique.
    #[x_kube(merge_strategy = ListMerge::Map(vec!["id".into()]))]
    #[schemars(length(max = 256))]
    #[x_kube(validation = Rule::new("size(self) > 0").message("a blueprint needs at least one resource"))]
    pub resources: Vec<ResourceSpec>,
    /// Bounds on rendering one object, so that a runaway template fails
    /// instead of hanging or filling memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<RenderLimits>,
}

/// Bounds on rendering: one object (one resource for one row), and all of
/// a blueprint's objects in one render. Flags of the same names raise them
/// for one run.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RenderLimits {
    /// Template instructions (loop iterations, expressions, filter calls)
    /// one object may take; default 10,000,000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("fuel must be at least 1"))]
    pub fuel: Option<u64>,
    /// Bytes of template output one object may take; default 1,048,576
    /// (1 MiB: the API server stores objects up to about 1.5 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("maxObjectBytes must be at least 1"))]
    pub max_object_bytes: Option<u64>,
    /// Bytes of template output all of the blueprint's objects may take in
    /// one render; default 268,435,456 (256 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("maxRenderBytes must be at least 1"))]
    pub max_render_bytes: Option<u64>,
}

impl RenderLimits {
    /// The default template instruction budget per object.
    pub const DEFAULT_FUEL: u64 = 10_000_000;
    /// The default output budget per object.
    pub const DEFAULT_MAX_OBJECT_BYTES: u64 = 1024 * 1024;
    /// The default output budget of one render, per blueprint.
    pub const DEFAULT_MAX_RENDER_BYTES: u64 = 256 * 1024 * 1024;

    /// The instruction budget.
    pub fn fuel(&self) -> u64 {
        self.fuel.unwrap_or(Self::DEFAULT_FUEL)
    }

    /// The output budget.
    pub fn max_object_bytes(&self) -> u64 {
        self.max_object_bytes
            .unwrap_or(Self::DEFAULT_MAX_OBJECT_BYTES)
    }

    /// The output budget of one render.
    pub fn max_render_bytes(&self) -> u64 {
        self.max_render_bytes
            .unwrap_or(Self::DEFAULT_MAX_RENDER_BYTES)
    }

    /// These limits with every one `raised` sets in its place.
    pub fn overridden_by(&self, raised: &RenderLimits) -> RenderLimits {
        RenderLimits {
            fuel: raised.fuel.or(self.fuel),
            max_object_bytes: raised.max_object_bytes.or(self.max_object_bytes),
            max_render_bytes: raised.max_render_bytes.or(self.max_render_bytes),
        }
    }
}

/// One object of a blueprint: its template, dependencies and policies.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("[has(self.template), has(self.templateFile), has(self.templateFrom)].filter(x, x).size() == 1").message("exactly one of template, templateFile and templateFrom must be set"))]
#[x_kube(validation = Rule::new("!has(self.dependsOn) || !(self.id in self.dependsOn)").message("a resource cannot depend on itself"))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResourceSpec {
    /// Unique within the blueprint; names the file `<id>.yaml`.
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')").message("id must be a DNS label: lowercase letters, digits and '-'"))]
    #[schemars(length(min = 1, max = 63))]
    pub id: String,
    /// An inline minijinja template that renders one object, or nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// A template file, relative to the configuration file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_file: Option<String>,
    /// A template kept in a ConfigMap of the Blueprint's namespace
    /// (controller only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_from: Option<TemplateFrom>,
    /// Ids of resources of the same blueprint that must be applied first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    #[schemars(inner(length(max = 63)))]
    pub depends_on: Vec<String>,
    /// `WhenNeeded` (default) creates and updates; `Once` only creates.
    #[serde(default, skip_serializing_if = "is_default")]
    pub creation_policy: CreationPolicy,
    /// `Delete` (default) prunes the object when it is no longer rendered;
    /// `Retain` leaves it and marks it orphaned.
    #[serde(default, skip_serializing_if = "is_default")]
    pub deletion_policy: DeletionPolicy,
    /// `Stuck` (default) reports fields owned by other managers; `Force` takes them.
    #[serde(default, skip_serializing_if = "is_default")]
    pub conflict_policy: ConflictPolicy,
    /// `apply` (Server-Side Apply, default), `merge` (JSON merge patch) or `replace` (PUT).
    #[serde(default, skip_serializing_if = "is_default")]
    pub patch_strategy: PatchStrategy,
    /// Dependents wait until this object is healthy.
    #[serde(default, skip_serializing_if = "is_default")]
    pub wait_for_ready: bool,
    /// How long to wait for readiness, e.g. `5m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^([0-9]+([.][0-9]+)?(ns|us|ms|s|m|h))+$') && duration(self) > duration('0s')").message("timeout must be a positive duration such as 30s, 5m or 1h"))]
    #[schemars(length(max = 32))]
    pub timeout: Option<String>,
    /// JSON pointers left out of drift detection, e.g. `/spec/replicas`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = 512)))]
    #[x_kube(validation = Rule::new("self.all(p, p.startsWith('/'))").message("ignoreFields are JSON pointers, each starting with '/', e.g. /spec/replicas"))]
    pub ignore_fields: Vec<String>,
    /// Declares the object cluster-scoped when its kind is neither built in
    /// nor defined by a CRD rendered in the same run.
    #[serde(default, skip_serializing_if = "is_default")]
    pub cluster_scoped: bool,
}

/// When an object is written.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum CreationPolicy {
    /// Create when missing, update when changed.
    #[default]
    WhenNeeded,
    /// Create when missing, never update.
    Once,
}

/// What happens to an object that is no longer rendered.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum DeletionPolicy {
    /// Delete it from the cluster.
    #[default]
    Delete,
    /// Keep it, without Kiln's labels, marked orphaned.
    Retain,
}

/// What happens when another field manager owns a field Kiln sets.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ConflictPolicy {
    /// Report the conflict and fail the resource.
    #[default]
    Stuck,
    /// Take the fields over.
    Force,
}

/// How an object is written.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum PatchStrategy {
    /// Server-Side Apply with field manager `kiln`.
    #[default]
    Apply,
    /// JSON merge patch.
    Merge,
    /// Replace the whole object (PUT).
    Replace,
}

/// Which blueprints render where.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "kiln.dev",
    version = "v1alpha1",
    kind = "Pipeline",
    namespaced,
    status = "PipelineStatus",
    doc = "Which blueprints render to which Git branch and directory",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Instances","type":"integer","jsonPath":".status.instances"}"#,
    printcolumn = r#"{"name":"Objects","type":"integer","jsonPath":".status.objects"}"#,
    printcolumn = r#"{"name":"Revision","type":"string","jsonPath":".status.lastAppliedRevision"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PipelineSpec {
    /// The blueprints this pipeline renders; all of them when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blueprints: Vec<String>,
    /// Where rendered trees are committed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git: Option<GitTarget>,
    /// Refuses renders that would remove too many instances at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_guard: Option<DeletionGuard>,
    /// Whether the controller applies what it renders (default true). With
    /// `git` and `apply: false` it only commits and pushes, and ArgoCD or
    /// Flux applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apply: Option<bool>,
    /// A ServiceAccount of the Pipeline's namespace (controller only). The
    /// controller reads and writes the rendered objects, and the objects
    /// of `kubernetes` sources, as this account, so the Pipeline can do no
    /// more than the account may. Default: the controller's
    /// `--default-service-account`, else the controller's own identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$')").message("serviceAccountName must be the name of a ServiceAccount: lowercase letters, digits, '-' and '.'"))]
    #[schemars(length(min = 1, max = 253))]
    pub service_account_name: Option<String>,
    /// How a change that touches every instance (a template, a blueprint's
    /// policy, Kiln's version) reaches the fleet: wave by wave. Without it
    /// every instance is updated in one pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutSpec>,
}

/// A progressive rollout: the waves in order, how long an instance may take
/// to become healthy, and what a failure does.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RolloutSpec {
    /// The waves, in the order they are reached. An instance belongs to the
    /// first wave that takes it; the last wave takes every instance no
    /// earlier one took, so it has no `instances`, `select` or `percent`.
    #[schemars(length(min = 1, max = 64))]
    pub waves: Vec<WaveSpec>,
    /// How long an instance may stay updating (from its first write of the
    /// new revision until all its objects are healthy) before it fails, as
    /// a duration (`90s`, `10m`, `1h`). Default `10m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress_deadline: Option<String>,
    /// What an instance that fails does to the rollout: `Pause` stops it
    /// there; `Rollback` also puts every updating instance back on its
    /// previous revision. Either way it waits for `kiln rollout resume` or
    /// `abort`.
    #[serde(default, skip_serializing_if = "is_default")]
    pub on_failure: OnFailure,
}

/// One wave of a rollout.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = Rule::new("[has(self.instances) && size(self.instances) > 0, has(self.select), has(self.percent)].filter(x, x).size() <= 1").message("a wave takes its instances by at most one of instances, select and percent"))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WaveSpec {
    /// The wave's name, unique in the rollout: a DNS label.
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')").message("a wave's name must be a DNS label: lowercase letters, digits and '-'"))]
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// These instances, by row key (`KEY`, or `BLUEPRINT/KEY` for one
    /// blueprint's). A key no row has is an error.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub instances: Vec<String>,
    /// The instances for which this expression is true, e.g.
    /// `row.tier == 'internal'`: a template expression over `row`, `key`
    /// and `blueprint`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub select: Option<String>,
    /// This share of all the instances, in percent (rounded up, at least
    /// one), taken from those no earlier wave took, spread by a hash of
    /// their key so that the same instances are taken every time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 100").message("percent must be between 1 and 100"))]
    pub percent: Option<u32>,
    /// How many of the wave's instances may be updating at once (default:
    /// all of them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("maxConcurrent must be at least 1"))]
    pub max_concurrent: Option<u32>,
    /// How many of the wave's instances must be healthy on the new revision
    /// before the next wave starts: a count (`3`) or a share (`95%`).
    /// Default `100%`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("type(self) == int ? self >= 0 : self.matches('^([0-9]+|([0-9]|[1-9][0-9]|100)%)$')").message("quorum must be a count (3) or a percentage (95%)"))]
    #[schemars(extend("maxLength" = 10))]
    pub quorum: Option<k8s_openapi::apimachinery::pkg::util::intstr::IntOrString>,
    /// What must hold before the wave starts; all of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub gates: Vec<GateSpec>,
}

/// A precondition of a wave: exactly one of its fields. `allOf` and
/// `anyOf` hold gates without `allOf` or `anyOf` of their own.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = Rule::new("[has(self.approval), has(self.window), has(self.condition), has(self.release), has(self.allOf), has(self.anyOf)].filter(x, x).size() == 1").message("a gate is exactly one of approval, window, condition, release, allOf and anyOf"))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GateSpec {
    /// Open once a person approved this wave for the exact revision being
    /// rolled out (`kiln rollout approve`); approving one revision never
    /// lets another through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalGate>,
    /// Open inside a time window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<WindowGate>,
    /// Open while a field of a cluster object has a value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub condition: Option<ConditionGate>,
    /// Per instance: Kiln asks the application before writing the new
    /// revision, and waits for its answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<ReleaseGate>,
    /// Open when every one of these is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 16))]
    pub all_of: Option<Vec<LeafGateSpec>>,
    /// Open when one of these is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 16))]
    pub any_of: Option<Vec<LeafGateSpec>>,
}

/// A gate inside `allOf` or `anyOf`: exactly one of its fields.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = Rule::new("[has(self.approval), has(self.window), has(self.condition), has(self.release)].filter(x, x).size() == 1").message("a gate in allOf or anyOf is exactly one of approval, window, condition and release"))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LeafGateSpec {
    /// See [`GateSpec::approval`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalGate>,
    /// See [`GateSpec::window`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<WindowGate>,
    /// See [`GateSpec::condition`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub condition: Option<ConditionGate>,
    /// See [`GateSpec::release`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<ReleaseGate>,
}

/// A manual approval; it has no settings.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApprovalGate {}

/// A time window, e.g. `{days: Mon-Fri, from: "09:00", to: "16:00",
/// timeZone: Europe/Berlin}`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WindowGate {
    /// The days: `Mon-Fri`, `Sat,Sun`, `Mon,Wed-Fri` (default every day).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub days: Option<String>,
    /// When the window opens each day, `HH:MM`.
    pub from: String,
    /// When it closes, `HH:MM`; before `from`, it closes the next day.
    pub to: String,
    /// An IANA time zone (default `UTC`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
}

/// An expression over one cluster object, e.g. an analysis object's
/// `object.status.phase == 'Succeeded'`, or a metric another tool writes,
/// `object.status.errorRate < 0.01`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConditionGate {
    /// The object's API version, e.g. `argoproj.io/v1alpha1`.
    pub api_version: String,
    /// Its kind.
    pub kind: String,
    /// Its name.
    pub name: String,
    /// Its namespace (namespaced kinds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// A template expression over `object` (the object as JSON); the gate
    /// is open while it is true, closed while the object is missing.
    #[schemars(length(min = 1))]
    pub expression: String,
}

/// The per-instance release handshake: before an instance is written on a
/// new revision, Kiln annotates its object `kiln.dev/update-requested:
/// <revision>` and waits until the application answers with the annotation
/// `kiln.dev/update-acknowledged: <revision>`; `progressDeadline` applies.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReleaseGate {
    /// The id of the resource (in the instance's blueprint) whose object
    /// carries the request and the answer.
    pub resource: String,
}

/// What a failed instance does to a rollout.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum OnFailure {
    /// Stop where it is.
    #[default]
    Pause,
    /// Stop, and put every updating instance back on its previous revision.
    Rollback,
}

/// What the controller last did with a Pipeline. Its size does not grow
/// with the number of instances: failing instances are named up to
/// [`PipelineStatus::MAX_NAMED`], and counted.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PipelineStatus {
    /// The generation of the spec the last pass followed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Reconciling` and `Stalled`, with a reason from what failed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
    /// The last commit the controller made (with `spec.git`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_commit: Option<String>,
    /// The revision of the desired state last applied in full: a commit
    /// with Git, else the digest of what shaped the render.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_applied_revision: Option<String>,
    /// When the last pass ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reconcile_time: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    /// Instances in the desired state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instances: Option<u64>,
    /// Objects in the desired state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub objects: Option<u64>,
    /// Objects the last pass created, updated or corrected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied: Option<u64>,
    /// Objects whose apply failed in the last pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<u64>,
    /// Objects found drifted in the last pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drifted: Option<u64>,
    /// Objects the last pass deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pruned: Option<u64>,
    /// Instances with a failed object in the last pass, counted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failing_instances: Option<u64>,
    /// Some of them, `blueprint/instance`, at most [`PipelineStatus::MAX_NAMED`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10))]
    pub failing: Vec<String>,
    /// Each source the Pipeline reads.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub sources: Vec<SourceState>,
    /// Where the rollout is (`spec.rollout`): counts, never names, so the
    /// status does not grow with the fleet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutStatus>,
}

/// A Pipeline's rollout, as its status shows it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    /// The revision being rolled out (the blueprints' digests and Kiln's
    /// version).
    pub revision: String,
    /// The revision it replaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_revision: Option<String>,
    /// `Progressing`, `Paused` or `Done`.
    pub phase: String,
    /// The wave it is in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wave: Option<String>,
    /// What it waits for, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
    /// Why it is paused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<String>,
    /// Waves approved for this revision.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub approved: Vec<String>,
    /// Instances by phase: pending, requested, updating, healthy, failed,
    /// rolledBack.
    #[serde(default)]
    pub instances: std::collections::BTreeMap<String, u64>,
    /// The last request of the `kiln.dev/rollout-request` annotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<RolloutRequest>,
}

/// A request made through the Pipeline's `kiln.dev/rollout-request`
/// annotation, and what came of it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RolloutRequest {
    /// Its id (the annotation's first word).
    pub id: String,
    /// Whether it was carried out.
    pub done: bool,
    /// What was done, or why not.
    pub message: String,
}

impl PipelineStatus {
    /// How many failing instances the status names.
    pub const MAX_NAMED: usize = 10;
}

/// What the last read of one source gave.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SourceState {
    /// The Source's name.
    pub name: String,
    /// Rows the last good read returned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<u64>,
    /// Why the last read failed; absent when it succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// A branch and directory of a Git repository.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GitTarget {
    /// The repository: a local path, or a URL to push to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The branch (default: the repository's current branch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    /// The directory inside the repository (default: its root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// A Secret of the Pipeline's namespace with the credentials to fetch
    /// and push (controller only): `username` and `password` (a token) for
    /// HTTPS, or `identity` (a private SSH key) and `known_hosts`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<LocalObjectReference>,
}

/// An object of the same namespace, by name.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalObjectReference {
    /// Its name.
    pub name: String,
}

/// The mass deletion guard.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeletionGuard {
    /// The largest share of instances one render may remove, in percent.
    #[x_kube(validation = Rule::new("self >= 0 && self <= 100").message("maxPercent must be between 0 and 100"))]
    pub max_percent: u32,
}

fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

/// The CRDs of every kind, in a fixed order.
pub fn crds()
-> Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>
{
    vec![Source::crd(), Blueprint::crd(), Pipeline::crd()]
}

/// The CRDs as one multi-document YAML stream, as `kiln crds` prints it and
/// `crds/kiln.dev.yaml` holds it.
pub fn crds_yaml() -> crate::Result<String> {
    let mut out = String::new();
    for crd in crds() {
        out.push_str("---\n");
        out.push_str(&crate::yaml::to_string(&crd)?);
    }
    Ok(out)
}
