//! What Kiln applied, recorded in the cluster so that prune knows what it may
//! delete, and only that.
//!
//! An inventory is a set of ConfigMaps `kiln-inventory-<name>-<i>` in one
//! namespace, labelled `kiln.dev/inventory-of: <name>`. Each holds one line per
//! object (group, version, kind, namespace, name, blueprint, instance,
//! resource id, wave, deletion policy, uid), tab-separated, sorted. The uid
//! is the object's as Kiln saw it after writing it (empty until then, and in
//! inventories written before it was recorded): prune deletes only that
//! object, never one of the same name someone else made since. Objects are
//! spread over the shards by a hash of their identity, and the shard count
//! (a power of two) grows so that no shard passes 256 KiB: 100,000 objects
//! take 64 shards of about 180 KiB, far from the 1 MiB limit of an object.
//! Only shards whose text changes are written.

use std::collections::{BTreeMap, HashSet};

use compact_str::CompactString;
use kiln_render::manifest::Identity;
use serde_json::json;
use sha2::Digest as _;

use crate::cluster::Cluster;
use crate::desired::Owner;
use crate::{Error, Result};

/// The label that names an inventory on its ConfigMaps (objects it applied
/// carry `kiln.dev/inventory` instead).
pub const LABEL: &str = "kiln.dev/inventory-of";
/// The data key holding a shard's lines.
const KEY: &str = "entries";
/// What a shard may grow to before the count doubles.
const SHARD_BYTES: usize = 256 * 1024;

/// One object Kiln applied.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Entry {
    /// Group, kind, namespace and name.
    pub identity: Identity,
    /// The version it was applied with.
    pub version: CompactString,
    /// Where it comes from.
    pub owner: Owner,
    /// Its wave when it was applied: prune goes in reverse.
    pub wave: usize,
    /// `deletionPolicy: Retain`.
    pub retain: bool,
    /// The uid of the object Kiln wrote; empty when not known yet.
    pub uid: CompactString,
}

/// What an inventory line is written from: an [`Entry`], or an object an
/// apply writes, recorded without making an entry of it first (an apply of
/// 100,000 objects would hold 100,000 more).
pub trait Record {
    /// The object's identity.
    fn identity(&self) -> &Identity;
    /// The object's uid as last seen; empty when not known.
    fn uid(&self) -> &str;
    /// Its line.
    fn line(&self) -> String;
}

/// An inventory line: an entry's fields, tab-separated.
pub fn line(
    identity: &Identity,
    version: &str,
    owner: &Owner,
    wave: usize,
    retain: bool,
    uid: &str,
) -> String {
    let (i, o) = (identity, owner);
    format!(
        "{}\t{version}\t{}\t{}\t{}\t{}\t{}\t{}\t{wave}\t{}\t{uid}",
        i.group,
        i.kind,
        i.namespace,
        i.name,
        o.blueprint,
        o.instance,
        o.resource,
        if retain { "Retain" } else { "Delete" },
    )
}

impl Record for Entry {
    fn identity(&self) -> &Identity {
        &self.identity
    }

    fn uid(&self) -> &str {
        &self.uid
    }

    fn line(&self) -> String {
        line(
            &self.identity,
            &self.version,
            &self.owner,
            self.wave,
            self.retain,
            &self.uid,
        )
    }
}

impl Entry {
    /// One line of a shard, or what is wrong with it.
    fn read(line: &str) -> Result<Self, String> {
        Self::parse(line).ok_or_else(|| format!("unreadable line {line:?}"))
    }

    fn parse(line: &str) -> Option<Self> {
        let f: Vec<&str> = line.split('\t').collect();
        // Ten fields: written before uids were recorded.
        if f.len() != 10 && f.len() != 11 {
            return None;
        }
        Some(Self {
            identity: Identity {
                group: f[0].into(),
                kind: f[2].into(),
                namespace: f[3].into(),
                name: f[4].into(),
            },
            version: f[1].into(),
            owner: Owner {
                blueprint: f[5].into(),
                instance: f[6].into(),
                resource: f[7].into(),
            },
            wave: f[8].parse().ok()?,
            retain: f[9] == "Retain",
            uid: f.get(10).copied().unwrap_or_default().into(),
        })
    }

    /// The entry for `identity` in `entries` sorted by identity (as
    /// [`Inventory::read`] leaves them): a binary search, so that looking
    /// objects up in a large inventory needs no table beside it.
    pub fn find<'e>(entries: &'e [Entry], identity: &Identity) -> Option<&'e Entry> {
        let at = entries.partition_point(|e| e.identity < *identity);
        entries.get(at).filter(|e| e.identity == *identity)
    }

    /// The `apiVersion` it was applied with.
    pub fn api_version(&self) -> String {
        if self.identity.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.identity.group, self.version)
        }
    }
}

/// The shards' texts by ConfigMap name, for `entries` spread over at least
/// `at_least` shards.
pub fn encode<R: Record>(name: &str, entries: &[R], at_least: usize) -> BTreeMap<String, String> {
    shards(entries, at_least)
        .into_iter()
        .enumerate()
        .map(|(i, members)| (shard_name(name, i), shard_text(entries, members)))
        .collect()
}

/// The members of each shard, for `entries` spread over at least
/// `at_least` shards.
fn shards<R: Record>(entries: &[R], at_least: usize) -> Vec<Vec<u32>> {
    let bytes: usize = entries.iter().map(|e| e.line().len() + 1).sum();
    let needed = bytes.div_ceil(SHARD_BYTES).max(1).next_power_of_two();
    // Keep the count while it fits, so that a small change rewrites one
    // shard; shrink only when far too many.
    let count = if at_least >= needed && at_least <= needed * 4 {
        at_least
    } else {
        needed
    };
    let mut shards: Vec<Vec<u32>> = vec![Vec::new(); count];
    for (i, entry) in entries.iter().enumerate() {
        shards[(fnv(entry.identity()) % count as u64) as usize].push(i as u32);
    }
    shards
}

/// The text of the shard of `entries` at `members`.
fn shard_text<R: Record>(entries: &[R], members: Vec<u32>) -> String {
    let mut lines: Vec<String> = members
        .into_iter()
        .map(|m| entries[m as usize].line())
        .collect();
    lines.sort_unstable();
    let mut text = String::with_capacity(lines.iter().map(|l| l.len() + 1).sum());
    for line in lines {
        text.push_str(&line);
        text.push('\n');
    }
    text
}

/// What is kept of a stored shard to tell whether it changes: its digest,
/// not its text.
fn shard_digest(text: &str) -> [u8; 32] {
    sha2::Sha256::digest(text.as_bytes()).into()
}

/// Keeps the first entry given for each object, sorted by identity. (A
/// stable sort would do it in one step, with a copy of the entries' size.)
fn first_of_each<R: Record>(entries: &mut Vec<R>) {
    let keep: Vec<bool> = {
        let mut seen = HashSet::with_capacity(entries.len());
        entries.iter().map(|e| seen.insert(e.identity())).collect()
    };
    let mut keep = keep.into_iter();
    entries.retain(|_| keep.next().unwrap_or(false));
    entries.sort_unstable_by(|a, b| a.identity().cmp(b.identity()));
}

/// Parses the shards' texts back, letting go of each once it is read.
pub fn decode(texts: Vec<String>) -> Result<Vec<Entry>, String> {
    let count = texts.iter().map(|t| t.lines().count()).sum();
    let mut entries = Vec::with_capacity(count);
    for text in texts {
        for line in text.lines().filter(|l| !l.is_empty()) {
            entries.push(Entry::read(line)?);
        }
    }
    // Unstable: a stable sort takes a copy of the entries' size.
    entries.sort_unstable();
    entries.dedup();
    Ok(entries)
}

fn shard_name(name: &str, index: usize) -> String {
    format!("kiln-inventory-{name}-{index}")
}

fn fnv(identity: &Identity) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in [
        &identity.group,
        &identity.kind,
        &identity.namespace,
        &identity.name,
    ] {
        for byte in part.bytes().chain([0]) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    // FNV's low bits are poorly mixed; a power-of-two modulus needs them.
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^ (hash >> 33)
}

/// An inventory as stored in the cluster.
#[derive(Debug, Clone)]
pub struct Inventory {
    /// Its name.
    pub name: String,
    /// The namespace of its ConfigMaps.
    pub namespace: String,
    /// Its entries, sorted.
    pub entries: Vec<Entry>,
    /// The digest of each shard's text, by ConfigMap name.
    stored: BTreeMap<String, [u8; 32]>,
}

impl Inventory {
    /// Reads inventory `name` from `namespace`; empty when it does not exist.
    pub async fn read(cluster: &Cluster, namespace: &str, name: &str) -> Result<Self> {
        let mut digests = BTreeMap::new();
        let mut texts = Vec::new();
        cluster
            .home()
            .config_maps(namespace, &format!("{LABEL}={name}"), |shard, mut data| {
                let text = data.remove(KEY).unwrap_or_default();
                digests.insert(shard, shard_digest(&text));
                texts.push(text);
            })
            .await?;
        let entries = decode(texts).map_err(|message| Error::Inventory {
            name: name.to_string(),
            message,
        })?;
        Ok(Self {
            name: name.to_string(),
            namespace: namespace.to_string(),
            entries,
            stored: digests,
        })
    }

    /// The instances (`blueprint/instance`) inventory `name` in
    /// `namespace` holds objects of: what the deletion guard compares, read
    /// without keeping an entry per object.
    pub async fn instances(
        cluster: &Cluster,
        namespace: &str,
        name: &str,
    ) -> Result<BTreeMap<String, ()>> {
        let mut instances = BTreeMap::new();
        let mut unreadable = None;
        cluster
            .home()
            .config_maps(namespace, &format!("{LABEL}={name}"), |_, data| {
                let text = data.get(KEY).map_or("", String::as_str);
                for line in text.lines().filter(|l| !l.is_empty()) {
                    match Entry::read(line) {
                        Ok(e) => {
                            instances.insert(e.owner.instance_path(), ());
                        }
                        Err(message) => {
                            unreadable.get_or_insert(message);
                        }
                    }
                }
            })
            .await?;
        match unreadable {
            Some(message) => Err(Error::Inventory {
                name: name.to_string(),
                message,
            }),
            None => Ok(instances),
        }
    }

    /// Makes `records` the inventory, writing only the shards that change
    /// and deleting shards no longer used. Returns how many were written.
    /// Of two records for one object, the first given is kept.
    /// [`Inventory::entries`] stay as read.
    pub async fn write<R: Record>(
        &mut self,
        cluster: &Cluster,
        mut records: Vec<R>,
    ) -> Result<usize> {
        first_of_each(&mut records);
        let entries = &records;
        let cluster = cluster.home();
        let mut writes = 0;
        let mut written = BTreeMap::new();
        // One shard's text at a time.
        for (i, members) in shards(entries, self.stored.len()).into_iter().enumerate() {
            let shard = shard_name(&self.name, i);
            let text = shard_text(entries, members);
            let digest = shard_digest(&text);
            if self.stored.get(&shard) == Some(&digest) {
                written.insert(shard, digest);
                continue;
            }
            if writes == 0 {
                cluster.ensure_namespace(&self.namespace).await?;
            }
            let body = json!({
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {
                    "name": shard,
                    "namespace": self.namespace,
                    "labels": {LABEL: self.name, "app.kubernetes.io/managed-by": "kiln"},
                },
                "data": {KEY: text},
            });
            cluster
                .apply_config_map(&self.namespace, &shard, &body)
                .await?;
            writes += 1;
            written.insert(shard, digest);
        }
        for shard in self.stored.keys() {
            if !written.contains_key(shard) {
                cluster.delete_config_map(&self.namespace, shard).await?;
                writes += 1;
            }
        }
        self.stored = written;
        Ok(writes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: usize) -> Entry {
        Entry {
            identity: Identity {
                group: "apps".into(),
                kind: "Deployment".into(),
                namespace: format!("tenant-{i}").into(),
                name: format!("app-{i}").into(),
            },
            version: "v1".into(),
            owner: Owner {
                blueprint: "web".into(),
                instance: format!("t{i}").into(),
                resource: "app".into(),
            },
            wave: 1,
            retain: i.is_multiple_of(2),
            uid: format!("0c8a6f0e-2b7c-4a55-9d2e-{i:012}").into(),
        }
    }

    #[test]
    fn entries_survive_encoding() {
        let entries: Vec<Entry> = (0..50).map(entry).collect();
        let shards = encode("prod", &entries, 0);
        assert_eq!(shards.len(), 1);
        let mut sorted = entries.clone();
        sorted.sort();
        assert_eq!(decode(shards.values().cloned().collect()).unwrap(), sorted);
        assert_eq!(sorted[0].api_version(), "apps/v1");
    }

    #[test]
    fn entries_are_found_by_identity() {
        let mut entries: Vec<Entry> = (0..50).map(entry).collect();
        entries.sort();
        for e in &entries {
            assert_eq!(Entry::find(&entries, &e.identity), Some(e));
        }
        let mut absent = entries[7].identity.clone();
        absent.name.push_str("-gone");
        assert_eq!(Entry::find(&entries, &absent), None);
        assert_eq!(Entry::find(&[], &absent), None);
    }

    #[test]
    fn a_hundred_thousand_entries_stay_far_below_the_object_size_limit() {
        let entries: Vec<Entry> = (0..100_000).map(entry).collect();
        let shards = encode("prod", &entries, 0);
        let largest = shards.values().map(String::len).max().unwrap();
        assert!(largest <= 256 * 1024, "largest shard {largest} bytes");
        assert_eq!(shards.len(), 64);
        assert_eq!(
            decode(shards.values().cloned().collect()).unwrap().len(),
            100_000
        );
    }

    #[test]
    fn a_line_written_before_uids_reads_with_none() {
        let line = "apps\tv1\tDeployment\tt-1\tapp\tweb\tt1\tapp\t1\tDelete";
        let entries = decode(vec![format!("{line}\n")]).unwrap();
        assert_eq!(entries[0].uid, "");
        assert_eq!(entries[0].identity.name, "app");
        let mut with_uid = entries[0].clone();
        with_uid.uid = "5e1f".into();
        assert_eq!(Entry::parse(&with_uid.line()), Some(with_uid));
        assert_eq!(Entry::parse("apps\tv1\tDeployment"), None);
    }

    #[test]
    fn one_new_entry_changes_one_shard() {
        let entries: Vec<Entry> = (0..20_000).map(entry).collect();
        let before = encode("prod", &entries, 0);
        let mut more = entries.clone();
        more.push(entry(20_001));
        let after = encode("prod", &more, before.len());
        let changed = before
            .iter()
            .filter(|(n, t)| after.get(*n) != Some(t))
            .count();
        assert_eq!(changed, 1);
    }
}
