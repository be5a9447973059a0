//! `kiln controller`: run in a cluster, driven by Kiln's custom resources.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use kiln_sync::controller::{self, LeaseOptions, Options};
use kiln_sync::metrics::Metrics;
use tokio::sync::watch;

use super::sync::{serve_metrics, stop_on_signal};
use crate::Outcome;

/// Arguments of `kiln controller`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The kubeconfig (default: KUBECONFIG, ~/.kube/config, in-cluster).
    #[arg(long, value_name = "F", env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// The kubeconfig context (default: the current one).
    #[arg(long, value_name = "C")]
    context: Option<String>,
    /// Writes in flight at most, per Pipeline.
    #[arg(long, value_name = "N", default_value_t = 16)]
    concurrency: usize,
    /// The namespace of the inventories' ConfigMaps and of the Lease
    /// (the controller's own namespace in a cluster).
    #[arg(
        long,
        value_name = "NS",
        env = "KILN_NAMESPACE",
        default_value = "kiln-system"
    )]
    namespace: String,
    /// Handle only the Pipelines this label selector matches, so that
    /// several controller deployments can share a fleet (`shard=a`).
    #[arg(long, value_name = "SELECTOR")]
    selector: Option<String>,
    /// Elect a leader among replicas through a Lease; only the leader writes.
    #[arg(long)]
    leader_elect: bool,
    /// The Lease's name; replicas with the same name and --selector elect
    /// one leader.
    #[arg(long, value_name = "NAME", default_value = "kiln-controller")]
    lease_name: String,
    /// How long a leader keeps the Lease without renewing it, e.g. 15s.
    #[arg(long, value_name = "DURATION", default_value = "15s")]
    lease_duration: String,
    /// This replica's name in the Lease and in Events (default: POD_NAME,
    /// else host name and process id).
    #[arg(long, value_name = "NAME", env = "POD_NAME")]
    identity: Option<String>,
    /// Where clones of Pipelines' Git remotes are kept (a writable volume
    /// in a pod); each Pipeline has a directory of its own.
    #[arg(long, value_name = "DIR", env = "KILN_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// The ServiceAccount (of the Pipeline's namespace) a Pipeline without
    /// spec.serviceAccountName acts as. Without one, such a Pipeline acts
    /// with the controller's own rights.
    #[arg(long, value_name = "NAME", env = "KILN_DEFAULT_SERVICE_ACCOUNT")]
    default_service_account: Option<String>,
    /// Refuse Pipelines that name no ServiceAccount and have no default
    /// (multi-tenant clusters: no Pipeline acts with the controller's rights).
    #[arg(long)]
    require_service_account: bool,
    /// Serve /metrics, /healthz and /readyz here, e.g. 0.0.0.0:9090.
    #[arg(long, value_name = "ADDR", env = "KILN_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
}

pub fn run(args: &Args) -> anyhow::Result<Outcome> {
    let duration = kiln_render::source::parse_duration(&args.lease_duration)
        .map_err(|e| anyhow::anyhow!("--lease-duration: {e}"))?;
    if duration < Duration::from_secs(1) {
        anyhow::bail!("--lease-duration: must be at least 1s");
    }
    if let Some(selector) = &args.selector
        && selector.trim().is_empty()
    {
        anyhow::bail!("--selector: empty; leave it out to handle every Pipeline");
    }
    if let Some(name) = &args.default_service_account
        && !kiln_render::template::is_dns_label(name)
    {
        anyhow::bail!("--default-service-account {name:?}: not a ServiceAccount name");
    }
    let identity = args.identity.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "kiln".into());
        format!("{host}-{}", std::process::id())
    });
    let options = Options {
        inventory_namespace: args.namespace.clone(),
        concurrency: args.concurrency,
        selector: args.selector.clone(),
        identity,
        cache_dir: args
            .cache_dir
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join("kiln-cache")),
        default_service_account: args.default_service_account.clone(),
        require_service_account: args.require_service_account,
        lease: args.leader_elect.then(|| LeaseOptions {
            namespace: args.namespace.clone(),
            name: args.lease_name.clone(),
            duration,
        }),
    };
    super::runtime()?.block_on(async move {
        let cluster =
            super::cluster::connect(args.kubeconfig.as_deref(), args.context.as_deref()).await?;
        let metrics = Metrics::default();
        let server = serve_metrics(args.metrics_addr, &metrics).await?;
        let (stop_tx, stop) = watch::channel(false);
        let stopper = stop_on_signal(stop_tx);
        let result = controller::run(cluster, options, metrics, stop).await;
        stopper.abort();
        if let Some(server) = server {
            server.abort();
        }
        result?;
        Ok(Outcome::Clean)
    })
}
