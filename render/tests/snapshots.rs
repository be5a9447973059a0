//! Snapshot tests over fixture directories: each `tests/inputs/<case>/kiln.yaml`
//! is rendered and the whole tree is compared with its committed snapshot.
//! Review changes with `cargo insta review` (or `INSTA_UPDATE=always`).

#![allow(clippy::unwrap_used)] // a test that cannot go on fails, with the cause

use kiln_render::tree;

mod common;

fn render_tree(config: &std::path::Path) -> String {
    let mut rendered = common::render_config(config).unwrap();
    let tree = tree::build(&rendered).unwrap();
    // The tree a sync commits moves the YAML instead of copying it: the
    // same files, byte for byte.
    let moved = tree::build_taking(&mut rendered).unwrap();
    assert_eq!(moved, tree, "{}", config.display());
    assert!(
        rendered
            .instances
            .iter()
            .flat_map(|i| &i.objects)
            .all(|o| o.yaml.is_empty())
    );
    tree.files
        .iter()
        .map(|(path, content)| format!("=== {path}\n{}", String::from_utf8_lossy(content)))
        .collect()
}

#[test]
fn rendered_trees() {
    insta::glob!("inputs/*/kiln.yaml", |path| {
        insta::assert_snapshot!(render_tree(path));
    });
}
