//! What every command that talks to a cluster shares: where the cluster and
//! the inventory are, and where the tree to apply comes from.

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use kiln_sync::apply::Options;
use kiln_sync::cluster::Cluster;
use kiln_sync::desired::{self, Desired};

use super::target::{self, GitArgs};

/// The cluster and the inventory.
#[derive(Debug, Clone, clap::Args)]
pub struct ClusterArgs {
    /// The kubeconfig (default: KUBECONFIG, ~/.kube/config, in-cluster).
    #[arg(long, value_name = "F", env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context (default: the current one).
    #[arg(long, value_name = "C")]
    pub context: Option<String>,
    /// Writes in flight at most.
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub concurrency: usize,
    /// The inventory: what this tree applied, so that prune knows what it may
    /// delete. Trees applied with different inventories never prune each other.
    /// [default: the Pipeline's name for `kiln sync`, else `default`]
    #[arg(long, value_name = "NAME", env = "KILN_INVENTORY")]
    pub inventory: Option<String>,
    /// The namespace of the inventory's ConfigMaps (created when missing).
    #[arg(
        long,
        value_name = "NS",
        env = "KILN_INVENTORY_NAMESPACE",
        default_value = "kiln-system"
    )]
    pub inventory_namespace: String,
}

impl ClusterArgs {
    /// Connects.
    pub async fn connect(&self) -> anyhow::Result<Cluster> {
        connect(self.kubeconfig.as_deref(), self.context.as_deref()).await
    }

    /// Apply options with these settings; `fallback` names the inventory
    /// when --inventory does not.
    pub fn options(&self, fallback: &str) -> anyhow::Result<Options> {
        let inventory = self.inventory.as_deref().unwrap_or(fallback);
        if !kiln_render::template::is_dns_label(inventory) || inventory.len() > 40 {
            bail!(
                "--inventory {inventory:?}: must be a DNS label of at most 40 characters (it names ConfigMaps)"
            );
        }
        Ok(Options {
            concurrency: self.concurrency.max(1),
            inventory: inventory.to_string(),
            inventory_namespace: self.inventory_namespace.clone(),
            ..Options::default()
        })
    }
}

/// Connects with `--kubeconfig` and `--context`.
pub async fn connect(
    kubeconfig: Option<&std::path::Path>,
    context: Option<&str>,
) -> anyhow::Result<Cluster> {
    // A kubeconfig given through the environment may list several files.
    let kubeconfig = kubeconfig.filter(|p| !p.as_os_str().to_string_lossy().contains(':'));
    let config = kiln_sync::client::config(kubeconfig, context).await?;
    let client = kiln_sync::client::from_config(config.clone())?;
    Ok(Cluster::with_config(client, config))
}

/// A rendered tree: a directory, or a revision of a Git repository.
#[derive(Debug, Clone, clap::Args)]
pub struct TreeArgs {
    /// A directory `kiln render --out` wrote.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["repo", "rev"])]
    pub dir: Option<PathBuf>,
    #[command(flatten)]
    pub git: GitArgs,
    /// The revision to read (default: the branch's tip).
    #[arg(long, value_name = "REV")]
    pub rev: Option<String>,
}

impl TreeArgs {
    /// Reads the objects of the tree.
    pub fn desired(&self) -> anyhow::Result<Vec<Desired>> {
        if let Some(dir) = &self.dir {
            if !dir.join(kiln_render::tree::KUSTOMIZATION).is_file() {
                bail!(
                    "--dir {}: no kustomization.yaml, so not a tree `kiln render --out` wrote",
                    dir.display()
                );
            }
            let tree = kiln_render::tree::read_dir(dir)?;
            return desired::from_tree(tree).with_context(|| format!("in {}", dir.display()));
        }
        if self.git.repo.is_none() {
            bail!("say what to apply: --dir DIR or --git REPO");
        }
        let target = target::resolve(&self.git, None)?;
        let tree = target
            .tree(self.rev.as_deref())
            .map_err(|e| match &self.rev {
                Some(_) => anyhow::anyhow!("--rev {e}"),
                None => e.into(),
            })?;
        Ok(desired::from_tree(tree)?)
    }
}
