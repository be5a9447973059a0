//! Showing what a render changes: unified diffs, a stat, a Markdown report
//! for a pull request comment, or JSON; Secret values masked in all of them.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;
use serde_json::{Value, json};
use similar::TextDiff;

use crate::git::repo::Change;
use crate::tree::{KUSTOMIZATION, Summary};
use crate::yaml;

/// Diff output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `diff -u` of every file.
    Unified,
    /// One line per file with its added and removed lines.
    Stat,
    /// A report for a pull request comment.
    Markdown,
    /// For programs.
    Json,
}

/// What a Markdown report shows at most before it truncates; totals stay exact.
const MARKDOWN_FILES: usize = 100;
const MARKDOWN_CHARS: usize = 60_000;

/// A file's change, masked and diffed.
#[derive(Debug, Clone, Serialize)]
pub struct FileDiff {
    /// Path below the render directory.
    pub path: String,
    /// added, changed or removed.
    pub status: &'static str,
    /// Lines added.
    pub insertions: usize,
    /// Lines removed.
    pub deletions: usize,
    /// The unified diff.
    pub diff: String,
}

/// Counts of one blueprint's changes.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Counts {
    /// Instances added, changed, removed.
    pub instances_added: usize,
    #[allow(missing_docs)]
    pub instances_changed: usize,
    #[allow(missing_docs)]
    pub instances_removed: usize,
    /// Objects (one file each) added, changed, removed.
    pub objects_added: usize,
    #[allow(missing_docs)]
    pub objects_changed: usize,
    #[allow(missing_docs)]
    pub objects_removed: usize,
}

/// A whole diff: per-file diffs and per-blueprint counts.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Counts per blueprint.
    pub blueprints: BTreeMap<String, Counts>,
    /// Every changed file.
    pub files: Vec<FileDiff>,
}

impl Report {
    /// Builds the report of `changes`, with `summary` giving the instances.
    pub fn new(summary: &Summary, changes: &[Change]) -> Report {
        let mut blueprints: BTreeMap<String, Counts> = BTreeMap::new();
        let blueprint_of = |name: &str| name.split('/').next().unwrap_or_default().to_string();
        for name in &summary.added {
            blueprints
                .entry(blueprint_of(name))
                .or_default()
                .instances_added += 1;
        }
        for name in &summary.changed {
            blueprints
                .entry(blueprint_of(name))
                .or_default()
                .instances_changed += 1;
        }
        for name in &summary.removed {
            blueprints
                .entry(blueprint_of(name))
                .or_default()
                .instances_removed += 1;
        }
        let files: Vec<FileDiff> = changes.iter().map(file_diff).collect();
        for file in &files {
            let parts: Vec<&str> = file.path.split('/').collect();
            if parts.len() != 3 || parts[2] == KUSTOMIZATION {
                continue;
            }
            let counts = blueprints.entry(parts[0].to_string()).or_default();
            match file.status {
                "added" => counts.objects_added += 1,
                "removed" => counts.objects_removed += 1,
                _ => counts.objects_changed += 1,
            }
        }
        Report { blueprints, files }
    }

    /// Whether nothing differs.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// The report in `format`.
    pub fn format(&self, format: Format, title: &str) -> String {
        match format {
            Format::Unified => self.files.iter().map(|f| f.diff.as_str()).collect(),
            Format::Stat => self.stat(),
            Format::Markdown => self.markdown(title),
            Format::Json => serde_json::to_string_pretty(self).unwrap_or_default() + "\n",
        }
    }

    fn totals(&self) -> (usize, usize) {
        self.files
            .iter()
            .fold((0, 0), |(i, d), f| (i + f.insertions, d + f.deletions))
    }

    fn stat(&self) -> String {
        let width = self.files.iter().map(|f| f.path.len()).max().unwrap_or(0);
        let mut out = String::new();
        for file in &self.files {
            let _ = writeln!(
                out,
                " {:width$} | {:>5} {}{}",
                file.path,
                file.insertions + file.deletions,
                "+".repeat(file.insertions.min(40)),
                "-".repeat(file.deletions.min(40)),
            );
        }
        let (insertions, deletions) = self.totals();
        let _ = writeln!(
            out,
            " {} files changed, {insertions} insertions(+), {deletions} deletions(-)",
            self.files.len()
        );
        out
    }

    fn markdown(&self, title: &str) -> String {
        let mut out = format!("### {title}\n\n");
        if self.files.is_empty() {
            out.push_str("No changes.\n");
            return out;
        }
        out.push_str("| blueprint | instances added | changed | removed | objects added | changed | removed |\n");
        out.push_str("|---|--:|--:|--:|--:|--:|--:|\n");
        let mut total = Counts::default();
        for (name, c) in &self.blueprints {
            let _ = writeln!(
                out,
                "| `{name}` | {} | {} | {} | {} | {} | {} |",
                c.instances_added,
                c.instances_changed,
                c.instances_removed,
                c.objects_added,
                c.objects_changed,
                c.objects_removed
            );
            total.instances_added += c.instances_added;
            total.instances_changed += c.instances_changed;
            total.instances_removed += c.instances_removed;
            total.objects_added += c.objects_added;
            total.objects_changed += c.objects_changed;
            total.objects_removed += c.objects_removed;
        }
        if self.blueprints.len() > 1 {
            let _ = writeln!(
                out,
                "| **total** | {} | {} | {} | {} | {} | {} |",
                total.instances_added,
                total.instances_changed,
                total.instances_removed,
                total.objects_added,
                total.objects_changed,
                total.objects_removed
            );
        }
        let (insertions, deletions) = self.totals();
        let _ = writeln!(
            out,
            "\n{} files changed, {insertions} insertions(+), {deletions} deletions(-)\n",
            self.files.len()
        );
        let mut shown = 0;
        for file in &self.files {
            let section = format!(
                "<details><summary><code>{}</code> ({}, +{} −{})</summary>\n\n```diff\n{}```\n\n</details>\n",
                file.path, file.status, file.insertions, file.deletions, file.diff
            );
            if shown == MARKDOWN_FILES || out.len() + section.len() > MARKDOWN_CHARS {
                break;
            }
            out.push_str(&section);
            shown += 1;
        }
        if shown < self.files.len() {
            let _ = writeln!(
                out,
                "\n… and {} more files not shown; run `kiln diff` locally for all of them.",
                self.files.len() - shown
            );
        }
        out
    }
}

fn file_diff(change: &Change) -> FileDiff {
    let (old, new) = mask(change.old.as_deref(), change.new.as_deref());
    let status = match (&change.old, &change.new) {
        (None, _) => "added",
        (_, None) => "removed",
        _ => "changed",
    };
    let a = if change.old.is_some() {
        format!("a/{}", change.path)
    } else {
        "/dev/null".into()
    };
    let b = if change.new.is_some() {
        format!("b/{}", change.path)
    } else {
        "/dev/null".into()
    };
    let diff = TextDiff::from_lines(old.as_str(), new.as_str());
    let (mut insertions, mut deletions) = (0, 0);
    for change in diff.iter_all_changes() {
        match change.tag() {
            similar::ChangeTag::Insert => insertions += 1,
            similar::ChangeTag::Delete => deletions += 1,
            similar::ChangeTag::Equal => {}
        }
    }
    let text = diff
        .unified_diff()
        .context_radius(3)
        .header(&a, &b)
        .to_string();
    FileDiff {
        path: change.path.clone(),
        status,
        insertions,
        deletions,
        diff: text,
    }
}

/// The text of both sides, with the values of a Secret's `data` and
/// `stringData` replaced by markers that tell only whether each key changed.
pub fn mask(old: Option<&[u8]>, new: Option<&[u8]>) -> (String, String) {
    let text = |b: Option<&[u8]>| String::from_utf8_lossy(b.unwrap_or_default()).into_owned();
    let parse = |b: Option<&[u8]>| -> Option<Value> {
        let value: Value = yaml::from_str(&text(b), "diff").ok()?;
        is_secret(&value).then_some(value)
    };
    let (old_secret, new_secret) = (parse(old), parse(new));
    if old_secret.is_none() && new_secret.is_none() {
        return (text(old), text(new));
    }
    // The old side always reads "(masked)"; the new side says "changed"
    // where the value differs, so a diff shows exactly which keys changed.
    let masked =
        |side: &Option<Value>, other: &Option<Value>, fallback: Option<&[u8]>, is_new: bool| {
            let Some(mut value) = side.clone() else {
                return text(fallback);
            };
            for field in ["data", "stringData"] {
                let Some(Value::Object(map)) = value.get_mut(field) else {
                    continue;
                };
                for (key, secret) in map.iter_mut() {
                    let before = other
                        .as_ref()
                        .and_then(|o| o.get(field))
                        .and_then(|d| d.get(key));
                    let changed = is_new && before != Some(secret);
                    *secret = json!(if changed {
                        "(masked, changed)"
                    } else {
                        "(masked)"
                    });
                }
            }
            yaml::to_string(&value).unwrap_or_default()
        };
    (
        masked(&old_secret, &new_secret, old, false),
        masked(&new_secret, &old_secret, new, true),
    )
}

pub use crate::manifest::is_secret;

/// Every file that differs between two trees, in path order.
pub fn changes(old: &crate::tree::Tree, new: &crate::tree::Tree) -> Vec<Change> {
    let paths: std::collections::BTreeSet<&String> =
        old.files.keys().chain(new.files.keys()).collect();
    paths
        .into_iter()
        .filter_map(|path| {
            let (before, after) = (old.files.get(path), new.files.get(path));
            (before != after).then(|| Change {
                path: path.clone(),
                old: before.cloned(),
                new: after.cloned(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_values_never_appear_and_changed_keys_are_marked() {
        let old = b"apiVersion: v1\nkind: Secret\nmetadata:\n  name: db\ndata:\n  user: YWRtaW4=\n  password: aHVudGVyMg==\n";
        let new = b"apiVersion: v1\nkind: Secret\nmetadata:\n  name: db\ndata:\n  user: YWRtaW4=\n  password: c2VjcmV0\n";
        let change = Change {
            path: "web/acme/secret.yaml".into(),
            old: Some(old.to_vec()),
            new: Some(new.to_vec()),
        };
        let file = file_diff(&change);
        for value in ["YWRtaW4=", "aHVudGVyMg==", "c2VjcmV0"] {
            assert!(!file.diff.contains(value), "{}", file.diff);
        }
        assert!(
            file.diff.contains("+  password: (masked, changed)"),
            "{}",
            file.diff
        );
        assert!(file.diff.contains("   user: (masked)"), "{}", file.diff);
    }

    #[test]
    fn markdown_truncates_sections_but_keeps_exact_totals() {
        let changes: Vec<Change> = (0..500)
            .map(|i| Change {
                path: format!("web/t{i:03}/app.yaml"),
                old: None,
                new: Some(format!("a: {i}\n").repeat(40).into_bytes()),
            })
            .collect();
        let summary = Summary {
            added: (0..500).map(|i| format!("web/t{i:03}")).collect(),
            ..Summary::default()
        };
        let text = Report::new(&summary, &changes).format(Format::Markdown, "diff");
        assert!(
            text.contains("| `web` | 500 | 0 | 0 | 500 | 0 | 0 |"),
            "{text}"
        );
        assert!(text.contains("500 files changed, 20000 insertions(+), 0 deletions(-)"));
        assert!(text.len() < MARKDOWN_CHARS + 200, "{}", text.len());
        assert!(text.contains("more files not shown"));
    }
}
