//! Watches on the kinds Kiln applied, so that the sync loop hears of a change
//! to one of its objects (an edit, a deletion, a label removed) at once
//! rather than at the next poll. Each event becomes a [`Note`]; the loop
//! reads the notes once its writes are done and starts no pass for those of
//! Kiln's own writes, prunes and orphanings (known by uid and
//! resourceVersion: an event may arrive before the answer to the write that
//! caused it, so the check waits for the loop).

use std::collections::HashMap;

use compact_str::CompactString;
use futures_util::StreamExt as _;
use kube::api::{Api, DynamicObject};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinHandle;

use crate::Result;
use crate::cluster::Cluster;
use crate::desired::{Desired, INVENTORY_LABEL};

/// What a watch heard.
#[derive(Debug, Clone)]
pub enum Note {
    /// An object of the inventory changed, or left it (deleted, a label
    /// removed).
    Changed {
        /// Its uid.
        uid: String,
        /// Its resourceVersion in the event.
        resource_version: String,
        /// It left the watch.
        gone: bool,
        /// It carries a deletion timestamp.
        terminating: bool,
    },
    /// The watch broke and listed again: anything may have changed.
    Relisted,
}

impl Note {
    /// Whether Kiln caused it (see [`crate::cluster::OwnWrites`]).
    pub fn is_own(&self, cluster: &Cluster) -> bool {
        match self {
            Note::Changed {
                uid,
                resource_version,
                gone,
                terminating,
            } => cluster
                .own_writes()
                .caused(uid, resource_version, *gone, *terminating),
            Note::Relisted => false,
        }
    }
}

/// One watch per kind, each sending a note when an object of the inventory
/// changes (or leaves it: a label removed).
#[derive(Debug)]
pub struct Watches {
    cluster: Cluster,
    selector: String,
    changed: UnboundedSender<Note>,
    /// By apiVersion, kind and namespace (empty: all namespaces).
    running: HashMap<(CompactString, CompactString, CompactString), JoinHandle<()>>,
}

impl Watches {
    /// No watches yet; notes go to `changed`.
    pub fn new(cluster: Cluster, inventory: &str, changed: UnboundedSender<Note>) -> Self {
        Self {
            cluster,
            selector: format!("{INVENTORY_LABEL}={inventory}"),
            changed,
            running: HashMap::new(),
        }
    }

    /// Starts a watch for every kind of `desired` not watched yet.
    pub async fn cover(&mut self, desired: &[Desired]) -> Result<()> {
        // Acting as a ServiceAccount, which may be confined to a few
        // namespaces, namespaced kinds are watched namespace by namespace.
        let confined = self.cluster.is_impersonating();
        for d in desired {
            let mut key = (
                d.api_version.clone(),
                d.identity.kind.clone(),
                CompactString::default(),
            );
            if confined {
                key.2 = d.identity.namespace.clone();
            }
            if self.running.contains_key(&key) {
                continue;
            }
            let Some(kind) = self.cluster.kind(&key.0, &key.1).await? else {
                continue;
            };
            let client = self.cluster.client().clone();
            let api: Api<DynamicObject> = if kind.namespaced && !key.2.is_empty() {
                Api::namespaced_with(client, &key.2, &kind.resource)
            } else {
                Api::all_with(client, &kind.resource)
            };
            let changed = self.changed.clone();
            let config = watcher::Config::default().labels(&self.selector);
            let task = tokio::spawn(async move {
                let mut stream = watcher::watcher(api, config).default_backoff().boxed();
                let mut listed = false;
                while let Some(event) = stream.next().await {
                    let note = match event {
                        Ok(Event::Apply(object)) => note(&object, false),
                        Ok(Event::Delete(object)) => note(&object, true),
                        // A relist after the watch broke (a restart of the
                        // API server): anything may have changed meanwhile.
                        Ok(Event::InitDone) => {
                            std::mem::replace(&mut listed, true).then_some(Note::Relisted)
                        }
                        Ok(_) => None,
                        Err(e) => {
                            tracing::debug!(error = %e, "watch interrupted; it resumes by itself");
                            None
                        }
                    };
                    if let Some(note) = note
                        && changed.send(note).is_err()
                    {
                        return;
                    }
                }
            });
            self.running.insert(key, task);
        }
        Ok(())
    }
}

fn note(object: &DynamicObject, gone: bool) -> Option<Note> {
    let meta = &object.metadata;
    Some(Note::Changed {
        uid: meta.uid.clone()?,
        resource_version: meta.resource_version.clone().unwrap_or_default(),
        gone,
        terminating: meta.deletion_timestamp.is_some(),
    })
}

impl Drop for Watches {
    fn drop(&mut self) {
        for task in self.running.values() {
            task.abort();
        }
    }
}
