//! The thin layer over the API server: discovery, reads and writes of
//! arbitrary kinds, each retried while the server is unavailable or asks
//! Kiln to slow down.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::Resource as _;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, GetParams, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams, Preconditions,
};
use kube::core::Request;
use kube::discovery::Scope;
use serde_json::{Value, json};

use crate::client::FIELD_MANAGER;
use crate::{Error, Result};

/// How long a request is retried while the server is unavailable (a
/// restart), overloaded (429) or failing (5xx).
const RETRY_FOR: Duration = Duration::from_secs(120);

/// A page of a list, its items unparsed.
#[derive(serde::Deserialize)]
struct Page {
    #[serde(default)]
    metadata: PageMetadata,
    #[serde(default)]
    items: Option<Vec<Box<serde_json::value::RawValue>>>,
}

#[derive(Default, serde::Deserialize)]
struct PageMetadata {
    #[serde(rename = "continue")]
    next: Option<String>,
}

/// Objects per page of a list: a page is parsed whole, so this bounds what
/// a list holds in memory at once.
const LIST_PAGE: u32 = 500;
/// ConfigMaps listed at once by [`Cluster::config_maps`]: an inventory's
/// shards are up to 256 KiB each.
const CONFIG_MAP_PAGE: u32 = 8;

/// An API request that failed for good, with the server's answer kept:
/// the caller asks what it was.
#[derive(Debug)]
pub struct Failure {
    error: kube::Error,
}

impl Failure {
    /// 409 from Server-Side Apply: another manager owns fields Kiln sets.
    pub fn is_conflict(&self) -> bool {
        matches!(&self.error, kube::Error::Api(s) if s.code == 409 && s.message.contains("conflict"))
    }

    /// 409 of any kind: the object changed since it was read, or exists
    /// already.
    pub fn is_stale(&self) -> bool {
        matches!(&self.error, kube::Error::Api(s) if s.code == 409)
    }

    /// 404.
    pub fn is_not_found(&self) -> bool {
        matches!(&self.error, kube::Error::Api(s) if s.code == 404)
    }

    /// 403: the identity Kiln runs as may not do this. The server's message
    /// names the user, verb, resource and namespace.
    pub fn is_forbidden(&self) -> bool {
        matches!(&self.error, kube::Error::Api(s) if s.code == 403)
    }

    /// Whether waiting may help: the server was restarting, overloaded or
    /// failing (Kiln retried it for a while already).
    pub fn is_retryable(&self) -> bool {
        transient(&self.error)
    }

    /// The error as the client reported it.
    pub fn kube_error(&self) -> &kube::Error {
        &self.error
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&message(&self.error))
    }
}

impl std::error::Error for Failure {}

impl From<kube::Error> for Failure {
    fn from(error: kube::Error) -> Self {
        Failure { error }
    }
}

/// A kind the server serves: its resource and scope.
#[derive(Debug, Clone)]
pub struct Kind {
    /// Group, version, plural.
    pub resource: ApiResource,
    /// Namespaced or cluster-scoped.
    pub namespaced: bool,
}

/// How an object is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Write {
    /// Server-Side Apply.
    Apply {
        /// Take fields other managers own.
        force: bool,
    },
    /// JSON merge patch, or create when missing.
    Merge,
    /// PUT over the live object, or create when missing.
    Replace,
}

/// A client with a discovery cache.
#[derive(Clone)]
pub struct Cluster {
    client: kube::Client,
    /// How `client` was made, so that a client acting as someone else can
    /// be made from it.
    config: Option<Arc<kube::Config>>,
    /// Kiln's own identity, for its own state (inventories), when `client`
    /// acts as someone else.
    home: Option<Box<Cluster>>,
    kinds: Arc<Mutex<HashMap<(String, String), Kind>>>,
    namespaced: Arc<tokio::sync::OnceCell<Vec<Kind>>>,
    retries: Arc<Retries>,
    own: Arc<OwnWrites>,
}

/// Kiln's own writes and deletions, so that a watch does not take the
/// events they cause for someone else's change (and start a pass for
/// nothing).
#[derive(Debug, Default)]
pub struct OwnWrites {
    inner: Mutex<OwnInner>,
}

#[derive(Debug, Default)]
struct OwnInner {
    /// The resourceVersion of Kiln's last write, by uid.
    written: HashMap<String, String>,
    /// Objects Kiln deleted or let go (orphaned), by uid.
    gone: std::collections::HashSet<String>,
}

/// How many deletions are remembered before the oldest memories are
/// dropped (a dropped one costs at most one extra pass).
const GONE_LIMIT: usize = 200_000;

impl OwnWrites {
    fn wrote(&self, object: &Value) {
        let meta = &object["metadata"];
        if let (Some(uid), Some(rv), Ok(mut inner)) = (
            meta["uid"].as_str(),
            meta["resourceVersion"].as_str(),
            self.inner.lock(),
        ) {
            inner.written.insert(uid.to_string(), rv.to_string());
        }
    }

    /// Notes that Kiln is deleting, or letting go of, the object `uid`.
    pub fn removing(&self, uid: &str) {
        if uid.is_empty() {
            return;
        }
        if let Ok(mut inner) = self.inner.lock() {
            if inner.gone.len() >= GONE_LIMIT {
                inner.gone.clear();
            }
            inner.written.remove(uid);
            inner.gone.insert(uid.to_string());
        }
    }

    /// Whether a watch event is Kiln's own doing: for the object `uid`
    /// at `resource_version`, `gone` when it left the watch, `terminating`
    /// when it carries a deletion timestamp.
    pub fn caused(&self, uid: &str, resource_version: &str, gone: bool, terminating: bool) -> bool {
        let Ok(mut inner) = self.inner.lock() else {
            return false;
        };
        if gone {
            return inner.gone.remove(uid);
        }
        (terminating && inner.gone.contains(uid))
            || inner
                .written
                .get(uid)
                .is_some_and(|rv| rv == resource_version)
    }
}

/// How often requests were retried, by why.
#[derive(Debug, Default)]
pub struct Retries {
    throttled: AtomicU64,
    unavailable: AtomicU64,
    warned: AtomicBool,
}

/// A reading of [`Retries`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetryCount {
    /// Answers 429 (API Priority and Fairness, max-in-flight) that were
    /// retried.
    pub throttled: u64,
    /// Transport errors and 5xx answers that were retried.
    pub unavailable: u64,
}

impl std::ops::Sub for RetryCount {
    type Output = RetryCount;
    fn sub(self, earlier: RetryCount) -> RetryCount {
        RetryCount {
            throttled: self.throttled.saturating_sub(earlier.throttled),
            unavailable: self.unavailable.saturating_sub(earlier.unavailable),
        }
    }
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").finish_non_exhaustive()
    }
}

impl Cluster {
    /// Wraps a client.
    pub fn new(client: kube::Client) -> Self {
        Self {
            client,
            config: None,
            home: None,
            kinds: Arc::default(),
            namespaced: Arc::default(),
            retries: Arc::default(),
            own: Arc::default(),
        }
    }

    /// Wraps a client made from `config`; [`Cluster::impersonating`] needs
    /// the configuration.
    pub fn with_config(client: kube::Client, config: kube::Config) -> Self {
        Self {
            config: Some(Arc::new(config)),
            ..Self::new(client)
        }
    }

    /// The same cluster, with every request made as `user` (impersonation:
    /// the API server authorizes each one by that user's rights), except
    /// Kiln's own state, which [`Cluster::home`] keeps writing as itself.
    /// Retry counts, Kiln's own writes and discovery are shared.
    pub fn impersonating(&self, user: &str) -> Result<Cluster> {
        let home = self.home().clone();
        let Some(config) = &home.config else {
            return Err(Error::Client {
                message: format!("cannot act as {user}: the client's configuration is unknown"),
            });
        };
        let mut config = (**config).clone();
        config.auth_info.impersonate = Some(user.to_string());
        let client = crate::client::from_config(config)?;
        Ok(Cluster {
            client,
            config: None,
            home: Some(Box::new(home.clone())),
            ..home
        })
    }

    /// Whether requests are made as someone else than Kiln itself.
    pub fn is_impersonating(&self) -> bool {
        self.home.is_some()
    }

    /// The cluster as Kiln itself, for Kiln's own state.
    pub fn home(&self) -> &Cluster {
        self.home.as_deref().unwrap_or(self)
    }

    /// How many requests were retried so far, by why.
    pub fn retries(&self) -> RetryCount {
        RetryCount {
            throttled: self.retries.throttled.load(Ordering::Relaxed),
            unavailable: self.retries.unavailable.load(Ordering::Relaxed),
        }
    }

    /// Kiln's own writes, for the watches.
    pub fn own_writes(&self) -> &OwnWrites {
        &self.own
    }

    /// The client.
    pub fn client(&self) -> &kube::Client {
        &self.client
    }

    /// What the server serves for `api_version` and `kind`; `None` when it
    /// does not know the kind (yet: its CRD may be applied in this run).
    pub async fn kind(&self, api_version: &str, kind: &str) -> Result<Option<Kind>> {
        let key = (api_version.to_string(), kind.to_string());
        if let Some(found) = self.cached(&key) {
            return Ok(Some(found));
        }
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        let gvk = GroupVersionKind::gvk(group, version, kind);
        let found = retry(&self.retries, || {
            kube::discovery::pinned_kind(&self.client, &gvk)
        })
        .await;
        let found = match found {
            Ok((resource, caps)) => Some(Kind {
                resource,
                namespaced: caps.scope == Scope::Namespaced,
            }),
            Err(kube::Error::Discovery(_)) => None,
            Err(kube::Error::Api(status)) if status.code == 404 => None,
            Err(e) => {
                return Err(Error::Api {
                    what: format!("discover {kind} in {api_version}"),
                    failure: classify(e),
                });
            }
        };
        // Unknown kinds are not remembered: their CRD may be applied next.
        if let Some(kind) = &found
            && let Ok(mut kinds) = self.kinds.lock()
        {
            kinds.insert(key, kind.clone());
        }
        Ok(found)
    }

    /// Every namespaced kind the server lists (events aside), discovered
    /// once.
    pub async fn namespaced_kinds(&self) -> Result<&[Kind]> {
        let kinds = self
            .namespaced
            .get_or_try_init(|| async {
                let discovery = kube::Discovery::new(self.client.clone());
                let discovery = match discovery.run_aggregated().await {
                    Ok(found) => found,
                    // Servers before aggregated discovery: one request per group.
                    Err(_) => kube::Discovery::new(self.client.clone())
                        .run()
                        .await
                        .map_err(|e| Error::Api {
                            what: "discover the server's kinds".into(),
                            failure: classify(e),
                        })?,
                };
                let mut kinds = Vec::new();
                for group in discovery.groups() {
                    for (resource, caps) in group.recommended_resources() {
                        if caps.scope == Scope::Namespaced
                            && caps.supports_operation(kube::discovery::verbs::LIST)
                            && resource.plural != "events"
                        {
                            kinds.push(Kind {
                                resource,
                                namespaced: true,
                            });
                        }
                    }
                }
                Ok::<_, Error>(kinds)
            })
            .await?;
        Ok(kinds)
    }

    /// The metadata of up to `limit` objects of `kind` in `namespace`.
    pub async fn list_metadata(
        &self,
        kind: &Kind,
        namespace: &str,
        limit: u32,
    ) -> Result<Vec<Value>, Failure> {
        let requests = Self::requests(kind, namespace);
        let params = ListParams {
            limit: Some(limit),
            ..ListParams::default()
        };
        let mut page = self
            .send(|| requests.list_metadata(&params))
            .await
            .map_err(classify)?;
        Ok(match page.get_mut("items").map(Value::take) {
            Some(Value::Array(items)) => items,
            _ => Vec::new(),
        })
    }

    fn cached(&self, key: &(String, String)) -> Option<Kind> {
        self.kinds.lock().ok().and_then(|k| k.get(key).cloned())
    }

    /// Requests for `kind` in `namespace` ("" for all namespaces or a
    /// cluster-scoped kind).
    fn requests(kind: &Kind, namespace: &str) -> Request {
        let namespace = (kind.namespaced && !namespace.is_empty()).then_some(namespace);
        Request::new(DynamicObject::url_path(&kind.resource, namespace))
    }

    /// Sends what `build` makes, retried; the answer as JSON.
    async fn send(
        &self,
        build: impl Fn() -> Result<http::Request<Vec<u8>>, kube::core::request::Error>,
    ) -> Result<Value, kube::Error> {
        self.send_as(build).await
    }

    /// Sends what `build` makes, retried; the answer read as `T`.
    async fn send_as<T: serde::de::DeserializeOwned>(
        &self,
        build: impl Fn() -> Result<http::Request<Vec<u8>>, kube::core::request::Error>,
    ) -> Result<T, kube::Error> {
        retry(&self.retries, || async {
            let request = build().map_err(kube::Error::BuildRequest)?;
            self.client.request::<T>(request).await
        })
        .await
    }

    /// Every object of `kind` matching `selector`, in `namespace` or in all.
    pub async fn list(
        &self,
        kind: &Kind,
        namespace: Option<&str>,
        selector: &str,
    ) -> Result<Vec<Value>> {
        self.list_selected(kind, namespace, Some(selector), None)
            .await
    }

    /// Every object of `kind` matching the label and field selectors, in
    /// `namespace` or in all, a page at a time.
    pub async fn list_selected(
        &self,
        kind: &Kind,
        namespace: Option<&str>,
        labels: Option<&str>,
        fields: Option<&str>,
    ) -> Result<Vec<Value>> {
        let mut objects = Vec::new();
        self.list_each(kind, namespace, labels, fields, |o| objects.push(o))
            .await?;
        Ok(objects)
    }

    /// Hands each object of `kind` matching the selectors to `each` as its
    /// page arrives, so that a caller keeping little of each holds one page
    /// at a time, not the whole list.
    pub async fn list_each(
        &self,
        kind: &Kind,
        namespace: Option<&str>,
        labels: Option<&str>,
        fields: Option<&str>,
        each: impl FnMut(Value),
    ) -> Result<()> {
        self.list_pages(kind, namespace, labels, fields, LIST_PAGE, each)
            .await
    }

    /// [`Cluster::list_each`], `page` objects at a time.
    async fn list_pages(
        &self,
        kind: &Kind,
        namespace: Option<&str>,
        labels: Option<&str>,
        fields: Option<&str>,
        page: u32,
        mut each: impl FnMut(Value),
    ) -> Result<()> {
        let requests = Self::requests(kind, namespace.unwrap_or_default());
        let mut token: Option<String> = None;
        loop {
            let params = ListParams {
                label_selector: labels.map(str::to_string),
                field_selector: fields.map(str::to_string),
                limit: Some(page),
                continue_token: token.clone(),
                ..ListParams::default()
            };
            // Each item stays text until its turn: a page of parsed
            // objects takes several times the memory of the page.
            let failed = |e| Error::Api {
                what: format!("list {}", kind.resource.plural),
                failure: classify(e),
            };
            let page: Page = self
                .send_as(|| requests.list(&params))
                .await
                .map_err(failed)?;
            token = page.metadata.next.filter(|t| !t.is_empty());
            for item in page.items.into_iter().flatten() {
                // An item that does not parse fails the list, as a page
                // that does not parse does: skipping it would make its
                // object look missing.
                let object = serde_json::from_str::<Value>(item.get())
                    .map_err(|e| failed(kube::Error::SerdeError(e)))?;
                each(value(object, kind));
            }
            if token.is_none() {
                return Ok(());
            }
        }
    }

    /// One object, if it exists.
    pub async fn get(
        &self,
        kind: &Kind,
        namespace: &str,
        name: &str,
    ) -> Result<Option<Value>, Failure> {
        let requests = Self::requests(kind, namespace);
        match self
            .send(|| requests.get(name, &GetParams::default()))
            .await
        {
            Ok(object) => Ok(Some(value(object, kind))),
            Err(e) => match classify(e) {
                f if f.is_not_found() => Ok(None),
                other => Err(other),
            },
        }
    }

    /// Hands the object's fields back: removes every `managedFields` entry of
    /// Kiln's (leaving other managers' alone), so that whoever takes the
    /// object over next does not conflict with Kiln.
    pub async fn release(&self, kind: &Kind, namespace: &str, name: &str) -> Result<(), Failure> {
        let requests = Self::requests(kind, namespace);
        let object = self
            .send(|| requests.get(name, &GetParams::default()))
            .await
            .map_err(classify)?;
        let entries = object["metadata"]["managedFields"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let mut others: Vec<Value> = entries
            .into_iter()
            .filter(|m| m["manager"] != FIELD_MANAGER)
            .collect();
        if others.is_empty() {
            // An empty list means "leave as is"; one empty entry clears them.
            others.push(json!({}));
        }
        let patch = json!({"metadata": {
            "managedFields": others,
            "resourceVersion": object["metadata"]["resourceVersion"],
        }});
        let patch = Patch::Merge(&patch);
        let params = PatchParams::default();
        self.send(|| requests.patch(name, &params, &patch))
            .await
            .map(|object| self.own.wrote(&object))
            .map_err(classify)
    }

    /// Writes `body` as `how` says; `live` is the object as last read (for
    /// merge and replace, which must know whether it exists).
    pub async fn write(
        &self,
        kind: &Kind,
        body: &Value,
        how: Write,
        live: Option<&Value>,
        dry_run: bool,
    ) -> Result<Value, Failure> {
        let namespace = body["metadata"]["namespace"].as_str().unwrap_or_default();
        let name = body["metadata"]["name"].as_str().unwrap_or_default();
        let requests = Self::requests(kind, namespace);
        let post = PostParams {
            dry_run,
            field_manager: Some(FIELD_MANAGER.into()),
        };
        let patch_params = |force: bool| PatchParams {
            dry_run,
            force,
            field_manager: Some(FIELD_MANAGER.into()),
            ..PatchParams::default()
        };
        let bytes = |body: &Value| serde_json::to_vec(body).unwrap_or_default();
        let result = match (how, live) {
            (Write::Apply { force }, _) => {
                let (params, patch) = (patch_params(force), Patch::Apply(body));
                self.send(|| requests.patch(name, &params, &patch)).await
            }
            (Write::Merge, Some(_)) => {
                let (params, patch) = (patch_params(false), Patch::Merge(body));
                self.send(|| requests.patch(name, &params, &patch)).await
            }
            (Write::Replace, Some(live)) => {
                let mut body = body.clone();
                body["metadata"]["resourceVersion"] = live["metadata"]["resourceVersion"].clone();
                let data = bytes(&body);
                self.send(|| requests.replace(name, &post, data.clone()))
                    .await
            }
            (Write::Merge | Write::Replace, None) => {
                let data = bytes(body);
                self.send(|| requests.create(&post, data.clone())).await
            }
        };
        if let (Ok(object), false) = (&result, dry_run) {
            self.own.wrote(object);
        }
        result.map(|o| value(o, kind)).map_err(classify)
    }

    /// A JSON merge patch of metadata (orphan markers, adoption).
    pub async fn patch_metadata(
        &self,
        kind: &Kind,
        namespace: &str,
        name: &str,
        patch: &Value,
    ) -> Result<(), Failure> {
        let requests = Self::requests(kind, namespace);
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PatchParams::default()
        };
        let patch = Patch::Merge(patch);
        self.send(|| requests.patch(name, &params, &patch))
            .await
            .map(|object| self.own.wrote(&object))
            .map_err(classify)
    }

    /// Deletes an object if it is still the one with `uid`.
    pub async fn delete(
        &self,
        kind: &Kind,
        namespace: &str,
        name: &str,
        uid: &str,
    ) -> Result<(), Failure> {
        self.own.removing(uid);
        let requests = Self::requests(kind, namespace);
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: (!uid.is_empty()).then(|| uid.to_string()),
                resource_version: None,
            }),
            ..DeleteParams::background()
        };
        match self.send(|| requests.delete(name, &params)).await {
            Ok(_) => Ok(()),
            Err(e) => match classify(e) {
                f if f.is_not_found() => Ok(()),
                other => Err(other),
            },
        }
    }

    /// Hands the name and data of each ConfigMap in `namespace` matching
    /// `selector` to `each`.
    pub async fn config_maps(
        &self,
        namespace: &str,
        selector: &str,
        mut each: impl FnMut(String, BTreeMap<String, String>),
    ) -> Result<()> {
        // A few at a time, the data moved out of each parsed map: an
        // inventory's shards hold a line per object, and a page of them
        // is held several times over while it is read.
        self.list_pages(
            &config_map_kind(),
            Some(namespace),
            Some(selector),
            None,
            CONFIG_MAP_PAGE,
            |mut map| {
                let Some(name) = map["metadata"]["name"].as_str().map(str::to_string) else {
                    return;
                };
                let data = match map["data"].take() {
                    Value::Object(data) => data
                        .into_iter()
                        .map(|(key, value)| match value {
                            Value::String(text) => (key, text),
                            _ => (key, String::new()),
                        })
                        .collect(),
                    _ => BTreeMap::new(),
                };
                each(name, data);
            },
        )
        .await
    }

    /// Applies a ConfigMap Kiln owns outright.
    pub async fn apply_config_map(&self, namespace: &str, name: &str, body: &Value) -> Result<()> {
        self.write(
            &config_map_kind(),
            body,
            Write::Apply { force: true },
            None,
            false,
        )
        .await
        .map(|_| ())
        .map_err(|f| Error::Api {
            what: format!("write ConfigMap {namespace}/{name}"),
            failure: f,
        })
    }

    /// Deletes a ConfigMap Kiln owns outright.
    pub async fn delete_config_map(&self, namespace: &str, name: &str) -> Result<()> {
        self.delete(&config_map_kind(), namespace, name, "")
            .await
            .map_err(|f| Error::Api {
                what: format!("delete ConfigMap {namespace}/{name}"),
                failure: f,
            })
    }

    /// Creates a namespace unless it exists.
    pub async fn ensure_namespace(&self, name: &str) -> Result<()> {
        let kind = Kind {
            resource: ApiResource::erase::<k8s_openapi::api::core::v1::Namespace>(&()),
            namespaced: false,
        };
        match self.get(&kind, "", name).await {
            Ok(Some(_)) => return Ok(()),
            Ok(None) => {}
            // Least privilege: an identity confined to its namespaces may not
            // read Namespaces. Its writes into a missing one fail and say so.
            Err(f) if f.is_forbidden() => return Ok(()),
            Err(f) => {
                return Err(Error::Api {
                    what: format!("read namespace {name}"),
                    failure: f,
                });
            }
        }
        let body = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
        self.write(&kind, &body, Write::Apply { force: false }, None, false)
            .await
            .map(|_| ())
            .map_err(|f| Error::Api {
                what: format!("create namespace {name}"),
                failure: f,
            })
    }
}

fn config_map_kind() -> Kind {
    Kind {
        resource: ApiResource::erase::<k8s_openapi::api::core::v1::ConfigMap>(&()),
        namespaced: true,
    }
}

/// An object as a value, with the `apiVersion` and `kind` lists leave out,
/// without `managedFields` (large, and never compared).
fn value(object: Value, kind: &Kind) -> Value {
    let Value::Object(fields) = object else {
        return Value::Null;
    };
    let mut map = serde_json::Map::with_capacity(fields.len() + 2);
    map.insert(
        "apiVersion".into(),
        kind.resource.api_version.clone().into(),
    );
    map.insert("kind".into(), kind.resource.kind.clone().into());
    for (key, mut value) in fields {
        if key == "metadata"
            && let Some(metadata) = value.as_object_mut()
        {
            metadata.remove("managedFields");
        }
        if key != "apiVersion" && key != "kind" {
            map.insert(key, value);
        }
    }
    Value::Object(map)
}

/// The server's own words for a failed request.
pub fn message(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) if !status.message.is_empty() => status.message.clone(),
        other => other.to_string(),
    }
}

/// A failed request as the other requests' failures are kept.
pub fn failure(error: kube::Error) -> Failure {
    classify(error)
}

fn classify(error: kube::Error) -> Failure {
    Failure { error }
}

/// Whether a failure may go away by waiting: the server is restarting,
/// overloaded or failing for the moment.
fn transient(error: &kube::Error) -> bool {
    match error {
        // Server-Side Apply answers 500 for an object its schema refuses
        // (a field the kind does not declare): the object is wrong, and
        // waiting changes nothing.
        kube::Error::Api(status)
            if status.code == 500
                && status
                    .message
                    .contains("failed to create typed patch object") =>
        {
            false
        }
        kube::Error::Api(status) => matches!(status.code, 429 | 500 | 502 | 503 | 504),
        kube::Error::HyperError(_) | kube::Error::Service(_) => true,
        _ => false,
    }
}

/// Runs `request` until it succeeds, fails for good, or [`RETRY_FOR`]
/// passes, backing off from 100 ms to 5 s with full jitter, so that writes
/// throttled together do not come back together. Counts every retry.
async fn retry<T, F, Fut>(retries: &Retries, mut request: F) -> Result<T, kube::Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, kube::Error>>,
{
    let deadline = tokio::time::Instant::now() + RETRY_FOR;
    let mut ceiling = Duration::from_millis(100);
    loop {
        match request().await {
            Err(e) if transient(&e) => {
                let delay = jitter(ceiling);
                if tokio::time::Instant::now() + delay >= deadline {
                    return Err(e);
                }
                let throttled = matches!(&e, kube::Error::Api(s) if s.code == 429);
                let counter = if throttled {
                    &retries.throttled
                } else {
                    &retries.unavailable
                };
                counter.fetch_add(1, Ordering::Relaxed);
                // Once per client: a restart fails every request in flight,
                // and a throttled identity sees many 429s at once.
                if !retries.warned.swap(true, Ordering::Relaxed) {
                    let why = if throttled {
                        "the API server asks Kiln to slow down"
                    } else {
                        "the API server did not answer"
                    };
                    tracing::warn!(
                        "{why} ({}); retrying for up to {}s",
                        message(&e),
                        RETRY_FOR.as_secs()
                    );
                }
                tracing::debug!(error = %message(&e), delay_ms = delay.as_millis() as u64, "retrying");
                tokio::time::sleep(delay).await;
                ceiling = (ceiling * 2).min(Duration::from_secs(5));
            }
            other => return other,
        }
    }
}

/// A delay between a tenth of `ceiling` and `ceiling`, drawn afresh each
/// call.
fn jitter(ceiling: Duration) -> Duration {
    use std::hash::{BuildHasher as _, Hasher as _};
    // Each RandomState is seeded anew: enough randomness to spread retries.
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(0);
    let fraction = (hasher.finish() % 1000) as f64 / 1000.0;
    ceiling.mul_f64(0.1 + 0.9 * fraction)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(code: u16, message: &str) -> kube::Error {
        kube::Error::Api(Box::new(kube::core::Status {
            code,
            message: message.into(),
            ..kube::core::Status::default()
        }))
    }

    #[test]
    fn overload_and_server_errors_are_retried_and_conflicts_are_reported() {
        assert!(transient(&api(429, "too many requests")));
        assert!(transient(&api(503, "unavailable")));
        assert!(!transient(&api(409, "conflict")));
        assert!(!transient(&api(422, "invalid")));
        let conflict = classify(api(
            409,
            "Apply failed with 1 conflict: conflict with \"x\": .data.a",
        ));
        assert!(conflict.is_conflict() && !conflict.is_forbidden());
        assert_eq!(
            conflict.to_string(),
            "Apply failed with 1 conflict: conflict with \"x\": .data.a"
        );
        assert!(classify(api(404, "gone")).is_not_found());
        assert!(classify(api(403, "configmaps is forbidden")).is_forbidden());
        assert!(classify(api(503, "unavailable")).is_retryable());
        assert!(!classify(api(422, "invalid")).is_retryable());
    }

    #[test]
    fn jitter_stays_within_a_tenth_and_the_ceiling_and_varies() {
        let ceiling = Duration::from_millis(1000);
        let delays: Vec<Duration> = (0..50).map(|_| jitter(ceiling)).collect();
        assert!(
            delays
                .iter()
                .all(|d| *d >= Duration::from_millis(100) && *d <= ceiling)
        );
        let first = delays[0];
        assert!(delays.iter().any(|d| *d != first), "{delays:?}");
    }
}
