//! Watches on the kinds Kiln applied, so that the sync loop hears of a change
//! to one of its objects (an edit, a deletion, a label removed) at once
//! rather than at the next poll.

use std::collections::HashMap;

use futures_util::StreamExt as _;
use kube::api::{Api, DynamicObject};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::Result;
use crate::cluster::Cluster;
use crate::desired::{Desired, INVENTORY_LABEL};

/// One watch per kind, each sending a note when an object of the inventory
/// changes (or leaves it: a label removed).
#[derive(Debug)]
pub struct Watches {
    cluster: Cluster,
    selector: String,
    changed: mpsc::Sender<()>,
    running: HashMap<(String, String), JoinHandle<()>>,
}

impl Watches {
    /// No watches yet; notes go to `changed`.
    pub fn new(cluster: Cluster, inventory: &str, changed: mpsc::Sender<()>) -> Self {
        Self {
            cluster,
            selector: format!("{INVENTORY_LABEL}={inventory}"),
            changed,
            running: HashMap::new(),
        }
    }

    /// Starts a watch for every kind of `desired` not watched yet.
    pub async fn cover(&mut self, desired: &[Desired]) -> Result<()> {
        for d in desired {
            let key = (d.api_version.clone(), d.identity.kind.clone());
            if self.running.contains_key(&key) {
                continue;
            }
            let Some(kind) = self.cluster.kind(&key.0, &key.1).await? else {
                continue;
            };
            let api: Api<DynamicObject> =
                Api::all_with(self.cluster.client().clone(), &kind.resource);
            let changed = self.changed.clone();
            let config = watcher::Config::default().labels(&self.selector);
            let task = tokio::spawn(async move {
                let mut stream = watcher::watcher(api, config).default_backoff().boxed();
                let mut listed = false;
                while let Some(event) = stream.next().await {
                    let note = match event {
                        Ok(Event::Apply(_) | Event::Delete(_)) => true,
                        // A relist after the watch broke (a restart of the
                        // API server): anything may have changed meanwhile.
                        Ok(Event::InitDone) => std::mem::replace(&mut listed, true),
                        Ok(_) => false,
                        Err(e) => {
                            tracing::debug!(error = %e, "watch interrupted; it resumes by itself");
                            false
                        }
                    };
                    if note && changed.try_send(()).is_err() && changed.is_closed() {
                        return;
                    }
                }
            });
            self.running.insert(key, task);
        }
        Ok(())
    }
}

impl Drop for Watches {
    fn drop(&mut self) {
        for task in self.running.values() {
            task.abort();
        }
    }
}
