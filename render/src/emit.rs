//! What ArgoCD and Flux need to deploy a rendered tree, written beside it in
//! `<path>/_kiln/` (a name no blueprint can take, since blueprint names are
//! DNS labels): an ArgoCD `ApplicationSet` with a Git directory generator
//! over the instance directories, or Flux `GitRepository` and
//! `Kustomization` objects, one per blueprint.
//!
//! Ordering: ArgoCD honours the `argocd.argoproj.io/sync-wave` annotation
//! Kiln stamps on every object, so each instance syncs in dependency order.
//! Flux applies a Kustomization in one server-side apply, staged so that
//! CustomResourceDefinitions, Namespaces and other cluster-wide objects go
//! first; with `wait: true` it then waits for every object to be healthy.
//! Kiln's deeper `dependsOn` chains are not expressed for Flux.

use serde_json::{Value, json};

use crate::tree::Tree;
use crate::{Result, yaml};

pub use crate::tree::EMIT_DIR as DIR;

/// Where the tree is published.
#[derive(Debug, Clone)]
pub struct Target<'a> {
    /// Names the generated objects (the Pipeline's name, or `render`).
    pub name: &'a str,
    /// The URL ArgoCD or Flux clones.
    pub repo_url: &'a str,
    /// The branch.
    pub branch: &'a str,
    /// The render directory inside the repository, `""` for the root.
    pub path: &'a str,
}

fn join(path: &str, rest: &str) -> String {
    if path.is_empty() {
        rest.to_string()
    } else {
        format!("{path}/{rest}")
    }
}

/// The metadata of an emitted object, labelled as Kiln's.
fn metadata(name: &str, namespace: &str) -> Value {
    json!({
        "name": name,
        "namespace": namespace,
        "labels": {"app.kubernetes.io/managed-by": "kiln"},
    })
}

/// An ArgoCD ApplicationSet: one Application per instance directory.
pub fn argocd(target: &Target<'_>) -> Value {
    let depth = target.path.split('/').filter(|p| !p.is_empty()).count();
    json!({
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "ApplicationSet",
        "metadata": metadata(&format!("kiln-{}", target.name), "argocd"),
        "spec": {
            "goTemplate": true,
            "goTemplateOptions": ["missingkey=error"],
            "generators": [{
                "git": {
                    "repoURL": target.repo_url,
                    "revision": target.branch,
                    "directories": [{"path": join(target.path, "*/*")}],
                },
            }],
            "template": {
                "metadata": {
                    "name": format!("{{{{ index .path.segments {depth} }}}}-{{{{ .path.basename }}}}"),
                    "labels": {"app.kubernetes.io/managed-by": "kiln"},
                },
                "spec": {
                    "project": "default",
                    "source": {
                        "repoURL": target.repo_url,
                        "targetRevision": target.branch,
                        "path": "{{ .path.path }}",
                    },
                    "destination": {"server": "https://kubernetes.default.svc"},
                    "syncPolicy": {
                        "automated": {"prune": true, "selfHeal": true},
                        "syncOptions": ["ServerSideApply=true"],
                    },
                },
            },
        },
    })
}

/// A Flux GitRepository and one Kustomization per blueprint.
pub fn flux(target: &Target<'_>, blueprints: &[String]) -> Vec<Value> {
    let source = format!("kiln-{}", target.name);
    let mut objects = vec![json!({
        "apiVersion": "source.toolkit.fluxcd.io/v1",
        "kind": "GitRepository",
        "metadata": metadata(&source, "flux-system"),
        "spec": {
            "interval": "1m",
            "url": target.repo_url,
            "ref": {"branch": target.branch},
        },
    })];
    for blueprint in blueprints {
        objects.push(json!({
            "apiVersion": "kustomize.toolkit.fluxcd.io/v1",
            "kind": "Kustomization",
            "metadata": metadata(&format!("kiln-{}-{blueprint}", target.name), "flux-system"),
            "spec": {
                "interval": "10m",
                "sourceRef": {"kind": "GitRepository", "name": source},
                "path": format!("./{}", join(target.path, blueprint)),
                "prune": true,
                "wait": true,
                "timeout": "5m",
            },
        }));
    }
    objects
}

/// Adds the emitted files to a rendered tree.
pub fn add(
    tree: &mut Tree,
    argocd_set: Option<Value>,
    flux_objects: Option<Vec<Value>>,
) -> Result<()> {
    if let Some(set) = argocd_set {
        tree.files.insert(
            format!("{DIR}/argocd.yaml"),
            yaml::to_string(&set)?.into_bytes(),
        );
    }
    if let Some(objects) = flux_objects {
        let mut text = String::new();
        for object in &objects {
            text.push_str("---\n");
            text.push_str(&yaml::to_string(object)?);
        }
        tree.files
            .insert(format!("{DIR}/flux.yaml"), text.into_bytes());
    }
    Ok(())
}
