//! The per-instance memo of renders into Git: what shaped each instance
//! (its row, its blueprint, Kiln's build, the CRD scopes of the render) and
//! what it produced there (its directory's tree id, the bytes it spent of
//! its blueprint's budget, a hash of each object's identity for the
//! collision check). A render in which 1% of the rows changed renders those
//! instances and takes the others' directories by tree id.
//!
//! A memo can cost time, never a wrong tree:
//! - an entry is found by a digest of everything an instance's render
//!   reads, so a changed row, template, policy, scope or build misses;
//! - a file that fails its checksum, comes from another build of Kiln, or
//!   names a tree the repository lacks is not used;
//! - a render that reused an instance and then finds any error, a budget
//!   passed or two objects with one identity hash is done again without
//!   the memo, so what it reports is what a full render reports;
//! - an instance that renders a CustomResourceDefinition (its scope reaches
//!   other instances) or a Secret in plain text (the guard names it) is
//!   never remembered: it renders every time.

use std::collections::HashMap;
use std::path::Path;

use git2::{ObjectType, Oid, Repository};
use sha2::{Digest as _, Sha256};

use crate::manifest::{Identity, Scopes};
use crate::render::{Compiled, Rendered};
use crate::source::Row;

/// A digest of everything an instance's render reads.
pub type Key = [u8; 32];

/// What the memo holds of one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its directory's tree in the repository.
    pub tree: Oid,
    /// Bytes of template output it spent of the blueprint's budget.
    pub bytes: u64,
    /// [`identity_hash`] of each of its objects.
    pub identities: Vec<u64>,
}

/// The memo of one render directory.
#[derive(Debug, Clone, Default)]
pub struct Memo {
    /// The CRD scopes the last render used: the first guess of this one.
    pub(crate) scopes: Option<Scopes>,
    entries: HashMap<Key, Entry>,
}

const HEADER: &[u8] = b"kiln instance memo 1\n";

/// What a build of Kiln is known by: its version and its executable's size
/// and time, so that a rebuilt Kiln (which may render differently) never
/// reuses what another build rendered.
pub fn build() -> &'static str {
    static BUILD: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BUILD.get_or_init(|| {
        let exe = std::env::current_exe()
            .and_then(std::fs::metadata)
            .ok()
            .map(|m| {
                let time = m
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_nanos());
                format!("{} {time}", m.len())
            })
            .unwrap_or_default();
        format!("{} {exe}", env!("CARGO_PKG_VERSION"))
    })
}

/// The digest of what the CRD scopes make cluster-scoped.
pub(crate) fn scopes_digest(scopes: &Scopes) -> Key {
    let mut hasher = Sha256::new();
    for (group, kind) in scopes.cluster_scoped() {
        hasher.update(group.as_bytes());
        hasher.update([0]);
        hasher.update(kind.as_bytes());
        hasher.update([0]);
    }
    hasher.finalize().into()
}

/// The digest of everything the render of `row` by `blueprint` reads:
/// Kiln's build, the blueprint (its name, spec and templates), the CRD
/// scopes, the row's key and values.
pub(crate) fn instance_key(blueprint: &Compiled, scopes: &Key, row: &Row) -> Key {
    let mut hasher = Sha256::new();
    for part in [
        build().as_bytes(),
        blueprint.name.as_bytes(),
        blueprint.digest.as_bytes(),
        scopes,
        row.key.as_bytes(),
    ] {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    hasher.update(serde_json::to_vec(&row.values).unwrap_or_default());
    hasher.finalize().into()
}

/// A stable 64-bit hash of an object's identity.
pub(crate) fn identity_hash(identity: &Identity) -> u64 {
    let mut hasher = Sha256::new();
    for part in [
        &identity.group,
        &identity.kind,
        &identity.namespace,
        &identity.name,
    ] {
        hasher.update(part.as_bytes());
        hasher.update([0]);
    }
    let digest = hasher.finalize();
    u64::from_le_bytes(digest[..8].try_into().unwrap_or_default())
}

impl Memo {
    /// What the memo holds for an instance with this key.
    pub(crate) fn get(&self, key: &Key) -> Option<&Entry> {
        self.entries.get(key)
    }

    /// How many instances it holds.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Reads the memo in `file`, keeping the entries whose tree `repo` has;
    /// an empty memo when there is none or it cannot be trusted.
    pub fn load(repo: &Repository, file: &Path) -> Memo {
        let Ok(bytes) = std::fs::read(file) else {
            return Memo::default();
        };
        let Some(mut memo) = decode(&bytes) else {
            tracing::debug!(file = %file.display(), "the instance memo is not usable; rendering every instance");
            return Memo::default();
        };
        let Ok(odb) = repo.odb() else {
            return Memo::default();
        };
        let _ = odb.refresh();
        memo.entries.retain(|_, e| {
            odb.exists_ext(e.tree, git2::OdbLookupFlags::NO_REFRESH)
                && odb
                    .read_header(e.tree)
                    .is_ok_and(|(_, t)| t == ObjectType::Tree)
        });
        memo
    }

    /// Records, in `file`, every instance of `rendered` that may be
    /// remembered, with its directory's id in the render directory `root`
    /// (a tree of `repo`). Best effort: a memo not written costs the next
    /// render time only.
    pub fn save(repo: &Repository, file: &Path, rendered: &Rendered, root: Oid) {
        let Some(memo) = Memo::of(repo, rendered, root) else {
            return;
        };
        crate::remember_in(file, encode(&memo), "the instances");
    }

    /// The memo of a render whose directory is the tree `root` of `repo`.
    fn of(repo: &Repository, rendered: &Rendered, root: Oid) -> Option<Memo> {
        let root = repo.find_tree(root).ok()?;
        let mut entries = HashMap::new();
        let mut listing: HashMap<&str, HashMap<String, Oid>> = HashMap::new();
        for instance in &rendered.instances {
            let Some(remembered) = &instance.remembered else {
                continue;
            };
            let blueprint = instance.blueprint.as_str();
            if !listing.contains_key(blueprint) {
                let dir = root
                    .get_name(blueprint)
                    .and_then(|e| e.to_object(repo).ok())
                    .and_then(|o| o.into_tree().ok());
                let ids = dir
                    .iter()
                    .flat_map(|t| t.iter())
                    .filter(|e| e.kind() == Some(ObjectType::Tree))
                    .filter_map(|e| Some((e.name().ok()?.to_string(), e.id())))
                    .collect();
                listing.insert(blueprint, ids);
            }
            let Some(tree) = listing[blueprint].get(&instance.name) else {
                continue;
            };
            entries.insert(
                remembered.key,
                Entry {
                    tree: *tree,
                    bytes: remembered.bytes,
                    identities: remembered.identities.clone(),
                },
            );
        }
        Some(Memo {
            scopes: rendered.scopes.clone(),
            entries,
        })
    }
}

/// The file's bytes: a header, the build, the scopes, the entries, and a
/// SHA-256 of all that.
fn encode(memo: &Memo) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + memo.entries.len() * 128);
    out.extend_from_slice(HEADER);
    put_bytes(&mut out, build().as_bytes());
    let scopes: Vec<(String, String)> = memo
        .scopes
        .as_ref()
        .map(|s| s.cluster_scoped().cloned().collect())
        .unwrap_or_default();
    out.push(u8::from(memo.scopes.is_some()));
    put_u64(&mut out, scopes.len() as u64);
    for (group, kind) in &scopes {
        put_bytes(&mut out, group.as_bytes());
        put_bytes(&mut out, kind.as_bytes());
    }
    // Sorted, so that the same memo is the same file.
    let mut entries: Vec<(&Key, &Entry)> = memo.entries.iter().collect();
    entries.sort_unstable_by_key(|(k, _)| *k);
    put_u64(&mut out, entries.len() as u64);
    for (key, entry) in entries {
        out.extend_from_slice(key);
        out.extend_from_slice(entry.tree.as_bytes());
        put_u64(&mut out, entry.bytes);
        put_u64(&mut out, entry.identities.len() as u64);
        for hash in &entry.identities {
            put_u64(&mut out, *hash);
        }
    }
    let sum = Sha256::digest(&out);
    out.extend_from_slice(&sum);
    out
}

/// Reads what [`encode`] wrote, by this build; `None` for anything else.
fn decode(bytes: &[u8]) -> Option<Memo> {
    let (body, sum) = bytes.split_at_checked(bytes.len().checked_sub(32)?)?;
    if Sha256::digest(body)[..] != *sum {
        return None;
    }
    let mut input = Reader(body.strip_prefix(HEADER)?);
    if input.bytes()? != build().as_bytes() {
        return None;
    }
    let has_scopes = input.take(1)?[0] == 1;
    let mut scopes = Vec::new();
    for _ in 0..input.u64()? {
        let group = String::from_utf8(input.bytes()?.to_vec()).ok()?;
        let kind = String::from_utf8(input.bytes()?.to_vec()).ok()?;
        scopes.push((group, kind));
    }
    let count = input.u64()?;
    let mut entries = HashMap::with_capacity(usize::try_from(count).ok()?.min(1 << 20));
    for _ in 0..count {
        let key: Key = input.take(32)?.try_into().ok()?;
        let tree = Oid::from_bytes(input.take(20)?).ok()?;
        let bytes = input.u64()?;
        let n = input.u64()?;
        let mut identities = Vec::with_capacity(usize::try_from(n).ok()?.min(1 << 16));
        for _ in 0..n {
            identities.push(input.u64()?);
        }
        entries.insert(
            key,
            Entry {
                tree,
                bytes,
                identities,
            },
        );
    }
    if !input.0.is_empty() {
        return None;
    }
    Some(Memo {
        scopes: has_scopes.then(|| Scopes::with_cluster_scoped(scopes)),
        entries,
    })
}

fn put_u64(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(&n.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_u64(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = usize::try_from(self.u64()?).ok()?;
        self.take(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Memo {
        let mut entries = HashMap::new();
        for i in 0..3u8 {
            entries.insert(
                [i; 32],
                Entry {
                    tree: Oid::from_bytes(&[i + 1; 20]).unwrap(),
                    bytes: 100 + u64::from(i),
                    identities: vec![u64::from(i), 7],
                },
            );
        }
        Memo {
            scopes: Some(Scopes::with_cluster_scoped(vec![(
                "example.com".into(),
                "Widget".into(),
            )])),
            entries,
        }
    }

    #[test]
    fn a_memo_reads_back_as_written_and_any_flipped_byte_discards_it() {
        let memo = sample();
        let bytes = encode(&memo);
        let read = decode(&bytes).expect("a memo this build wrote reads back");
        assert_eq!(read.entries, memo.entries);
        assert_eq!(read.scopes, memo.scopes);
        for at in [0, HEADER.len() + 3, bytes.len() / 2, bytes.len() - 1] {
            let mut corrupt = bytes.clone();
            corrupt[at] ^= 0x20;
            assert!(
                decode(&corrupt).is_none(),
                "a flipped byte at {at} was read"
            );
        }
        assert!(decode(&bytes[..bytes.len() - 1]).is_none());
        assert!(decode(b"").is_none());
    }

    #[test]
    fn a_memo_of_another_build_is_not_read() {
        let memo = sample();
        let mut bytes = encode(&memo);
        // Rewrite the build it names and its checksum: well formed, but not
        // this build's.
        let at = HEADER.len() + 8;
        bytes[at] ^= 1;
        let body = bytes.len() - 32;
        let sum = Sha256::digest(&bytes[..body]);
        bytes[body..].copy_from_slice(&sum);
        assert!(decode(&bytes).is_none());
    }
}
