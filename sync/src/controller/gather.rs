//! A Pipeline's configuration read from the cluster: what files give the
//! CLI comes from Blueprints, Sources, ConfigMaps and Secrets here. A
//! Pipeline reads only objects of its own namespace, so one team's
//! Pipeline cannot borrow another's templates or database passwords.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kiln_render::api::{Blueprint, Pipeline, Source};
use kiln_render::config::{Config, Named};
use kiln_render::git::remote::Credentials;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use sha2::Digest as _;

use super::status::Trouble;
use crate::cluster::Failure;

/// A ConfigMap or Secret a Pipeline's objects name, in its namespace.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reference {
    /// A ConfigMap holding a template.
    ConfigMap(String),
    /// A Secret holding a source's URL.
    Secret(String),
}

/// Why a configuration could not be assembled.
impl Trouble {
    fn invalid(message: String) -> Self {
        Trouble {
            reason: "InvalidConfiguration",
            message,
            stalled: true,
        }
    }

    fn missing(message: String) -> Self {
        Trouble {
            reason: "ReferenceNotFound",
            message,
            stalled: true,
        }
    }

    fn api(what: String, e: kube::Error) -> Self {
        let failure = Failure::from(e);
        Trouble {
            reason: if failure.is_forbidden() {
                "Forbidden"
            } else {
                "ApiFailed"
            },
            message: format!("{what}: {failure}"),
            stalled: false,
        }
    }
}

/// A Pipeline's configuration, as the CLI would have loaded it from files.
#[derive(Debug)]
pub struct Gathered {
    /// The Pipeline, its blueprints and their sources, templates inline and
    /// URLs resolved.
    pub config: Config,
    /// The blueprints the Pipeline names (all of the namespace's when none).
    pub selected: Vec<String>,
    /// The credentials of `spec.git.secretRef`.
    pub git_credentials: Option<Credentials>,
    /// SHA-256 of everything above: a change means a new engine.
    pub digest: String,
}

/// Reads what `pipeline` renders. The references are returned even when the
/// configuration is incomplete: a ConfigMap that is missing now starts a
/// pass when it is created.
pub async fn gather(
    client: &Client,
    pipeline: &Pipeline,
) -> (BTreeSet<Reference>, Result<Gathered, Trouble>) {
    let mut references = BTreeSet::new();
    let result = assemble(client, pipeline, &mut references).await;
    (references, result)
}

async fn assemble(
    client: &Client,
    pipeline: &Pipeline,
    references: &mut BTreeSet<Reference>,
) -> Result<Gathered, Trouble> {
    let namespace = pipeline.namespace().unwrap_or_default();
    let origin = PathBuf::from(format!("namespace {namespace}"));
    let blueprints: Api<Blueprint> = Api::namespaced(client.clone(), &namespace);
    let sources: Api<Source> = Api::namespaced(client.clone(), &namespace);
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    let mut all_blueprints = blueprints
        .list(&ListParams::default())
        .await
        .map_err(|e| Trouble::api(format!("list Blueprints in {namespace}"), e))?
        .items;
    all_blueprints.sort_by_key(ResourceExt::name_any);
    let selected: Vec<String> = if pipeline.spec.blueprints.is_empty() {
        all_blueprints.iter().map(ResourceExt::name_any).collect()
    } else {
        pipeline.spec.blueprints.clone()
    };
    let mut named_blueprints = Vec::new();
    for blueprint in all_blueprints {
        let name = blueprint.name_any();
        if !selected.contains(&name) {
            continue;
        }
        let mut spec = blueprint.spec;
        for (i, resource) in spec.resources.iter_mut().enumerate() {
            let at = format!("Blueprint {name}: spec.resources[{i}] (id {})", resource.id);
            if resource.template_file.is_some() {
                return Err(Trouble::invalid(format!(
                    "{at}: templateFile names a file of the controller's file system; use template or templateFrom"
                )));
            }
            let Some(from) = resource.template_from.take() else {
                continue;
            };
            let key = from.config_map_key_ref;
            references.insert(Reference::ConfigMap(key.name.clone()));
            let config_map =
                referenced(&config_maps, &key.name, &format!("{at}: templateFrom")).await?;
            let text = config_map
                .data
                .as_ref()
                .and_then(|d| d.get(&key.key))
                .ok_or_else(|| {
                    Trouble::missing(format!(
                        "{at}: templateFrom: ConfigMap {namespace}/{} has no key {}",
                        key.name, key.key
                    ))
                })?;
            resource.template = Some(text.clone());
        }
        named_blueprints.push(Named {
            name,
            spec,
            file: origin.clone(),
        });
    }
    let wanted: BTreeSet<String> = named_blueprints
        .iter()
        .map(|b| b.spec.source.clone())
        .collect();
    let mut named_sources = Vec::new();
    let mut listed = sources
        .list(&ListParams::default())
        .await
        .map_err(|e| Trouble::api(format!("list Sources in {namespace}"), e))?
        .items;
    listed.sort_by_key(ResourceExt::name_any);
    for source in listed {
        let name = source.name_any();
        if !wanted.contains(&name) {
            continue;
        }
        let mut spec = source.spec;
        let at = format!("Source {name}");
        if spec.seed_file.is_some() {
            return Err(Trouble::invalid(format!(
                "{at}: spec.seedFile names a file of the controller's file system; create the database beforehand"
            )));
        }
        if let Some(from) = spec.url_from.take() {
            if from.env.is_some() {
                return Err(Trouble::invalid(format!(
                    "{at}: urlFrom.env would read the controller's environment; use urlFrom.secretKeyRef"
                )));
            }
            if let Some(key) = from.secret_key_ref {
                references.insert(Reference::Secret(key.name.clone()));
                let secret =
                    referenced(&secrets, &key.name, &format!("{at}: urlFrom.secretKeyRef")).await?;
                let bytes = secret
                    .data
                    .as_ref()
                    .and_then(|d| d.get(&key.key))
                    .ok_or_else(|| {
                        Trouble::missing(format!(
                            "{at}: urlFrom.secretKeyRef: Secret {namespace}/{} has no key {}",
                            key.name, key.key
                        ))
                    })?;
                let url = String::from_utf8(bytes.0.clone()).map_err(|_| {
                    Trouble::invalid(format!(
                        "{at}: urlFrom.secretKeyRef: Secret {namespace}/{} key {} is not UTF-8",
                        key.name, key.key
                    ))
                })?;
                spec.url = Some(url.trim().to_string());
            }
        }
        if let Some(url) = &spec.url {
            check_path(&at, url)?;
        }
        if let Some(objects) = spec.kubernetes.as_mut() {
            match &objects.namespace {
                Some(other) if *other != namespace => {
                    return Err(Trouble::invalid(format!(
                        "{at}: spec.kubernetes.namespace {other}: a Source reads objects of its own namespace only"
                    )));
                }
                _ => objects.namespace = Some(namespace.clone()),
            }
        }
        named_sources.push(Named {
            name,
            spec,
            file: origin.clone(),
        });
    }
    let git_credentials = match pipeline
        .spec
        .git
        .as_ref()
        .and_then(|g| g.secret_ref.as_ref())
    {
        None => None,
        Some(reference) => {
            let at = "Pipeline: spec.git.secretRef";
            references.insert(Reference::Secret(reference.name.clone()));
            let secret = referenced(&secrets, &reference.name, at).await?;
            let data = secret.data.unwrap_or_default();
            let field = |key: &str| {
                data.get(key)
                    .map(|v| String::from_utf8_lossy(&v.0).into_owned())
                    .filter(|v| !v.is_empty())
            };
            let credentials = Credentials {
                username: field("username"),
                password: field("password").or_else(|| field("bearerToken")),
                identity: field("identity"),
                known_hosts: field("known_hosts"),
            };
            if credentials.identity.is_some() && credentials.known_hosts.is_none() {
                return Err(Trouble::invalid(format!(
                    "{at}: Secret {namespace}/{} has an identity but no known_hosts: Kiln does not trust an SSH host it cannot check",
                    reference.name
                )));
            }
            Some(credentials)
        }
    };
    let pipeline_named = Named {
        name: pipeline.name_any(),
        spec: pipeline.spec.clone(),
        file: origin.clone(),
    };
    let digest = {
        let mut hasher = sha2::Sha256::new();
        let mut feed = |value: serde_json::Result<Vec<u8>>| {
            hasher.update(value.unwrap_or_default());
            hasher.update([0]);
        };
        feed(serde_json::to_vec(&pipeline_named.spec));
        for b in &named_blueprints {
            feed(serde_json::to_vec(&(&b.name, &b.spec)));
        }
        for s in &named_sources {
            feed(serde_json::to_vec(&(&s.name, &s.spec)));
        }
        if let Some(c) = &git_credentials {
            feed(serde_json::to_vec(&(
                &c.username,
                &c.password,
                &c.identity,
                &c.known_hosts,
            )));
        }
        format!("{:x}", hasher.finalize())
    };
    // The controller acts on the account itself; the engine never sees it.
    let mut pipeline_named = pipeline_named;
    pipeline_named.spec.service_account_name = None;
    let config = Config::assemble(named_sources, named_blueprints, vec![pipeline_named])
        .map_err(|e| Trouble::invalid(one_line(&e)))?;
    Ok(Gathered {
        config,
        selected,
        git_credentials,
        digest,
    })
}

/// The ConfigMap or Secret `name` that the field `at` names, in the API's
/// namespace: a missing one is `ReferenceNotFound`.
async fn referenced<K>(api: &Api<K>, name: &str, at: &str) -> Result<K, Trouble>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let kind = K::kind(&());
    let namespace = api.namespace().unwrap_or_default().to_string();
    api.get_opt(name)
        .await
        .map_err(|e| Trouble::api(format!("{at}: read {kind} {name}"), e))?
        .ok_or_else(|| Trouble::missing(format!("{at}: no {kind} {namespace}/{name}")))
}

/// A file or SQLite source must name an absolute path: there is no
/// configuration file for a relative one to resolve against.
fn check_path(at: &str, url: &str) -> Result<(), Trouble> {
    let Some((scheme, rest)) = url.split_once(':') else {
        return Ok(());
    };
    if !matches!(scheme.to_ascii_lowercase().as_str(), "file" | "sqlite") {
        return Ok(());
    }
    let path = rest.trim_start_matches("//");
    let path = path.split('?').next().unwrap_or_default();
    if Path::new(path).is_absolute() || path.starts_with(":memory:") {
        Ok(())
    } else {
        Err(Trouble::invalid(format!(
            "{at}: spec.url: a {scheme}: path must be absolute in the controller (a mounted volume)"
        )))
    }
}

/// Every problem of an error on one line.
pub fn one_line(error: &dyn std::fmt::Display) -> String {
    error
        .to_string()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}
