//! `kiln render` and `kiln validate` end to end, as a user runs them: the
//! demo, determinism, stale files, and every kind of bad input, which must
//! exit 2 with one line that names the culprit and write nothing.

#![allow(clippy::unwrap_used)] // a test that cannot go on fails, with the cause

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;

mod common;

use common::{kiln, stderr, stdout};

/// Writes `files` (path, content) under a new temporary directory.
fn project(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (path, content) in files {
        let path = dir.path().join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
    }
    dir
}

/// Every file under `dir`, by relative path.
fn read_tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let relative = path
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                out.insert(relative, std::fs::read(&path).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    if dir.exists() {
        walk(dir, dir, &mut out);
    }
    out
}

fn demo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/demo")
}

const SOURCE: &str = r#"
apiVersion: kiln.dev/v1alpha1
kind: Source
metadata: {name: tenants}
spec:
  url: file:tenants.json
  key: id
  active: active
"#;

const TENANTS: &str = r#"[
  {"id": "acme", "plan": "pro", "replicas": 2, "active": true, "note": null},
  {"id": "globex", "plan": "free", "replicas": 1, "active": "yes", "note": "vip"},
  {"id": "initech", "plan": "free", "replicas": 1, "active": false, "note": null}
]"#;

fn blueprint(resources: &str) -> String {
    format!(
        "apiVersion: kiln.dev/v1alpha1\nkind: Blueprint\nmetadata: {{name: web}}\nspec:\n  source: tenants\n  namespace: \"tenant-{{{{ key }}}}\"\n  resources:\n{resources}"
    )
}

const CONFIG_MAP: &str = "  - id: config\n    template: |\n      apiVersion: v1\n      kind: ConfigMap\n      metadata: {name: cfg}\n      data: {plan: \"{{ row.plan }}\"}\n";

/// `kiln render -f DIR --out OUT` with `extra` flags.
fn render_out(dir: &std::path::Path, out: &std::path::Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "render",
        "-f",
        dir.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    kiln(&args)
}

/// Renders a project that must fail: exit 2, one line naming `expected`,
/// and nothing written to the output directory.
fn assert_refused(files: &[(&str, &str)], expected: &[&str]) {
    let dir = project(files);
    let out = dir.path().join("out");
    let output = render_out(dir.path(), &out, &[]);
    let message = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{message}");
    assert_eq!(message.trim_end().lines().count(), 1, "one line: {message}");
    for part in expected {
        assert!(message.contains(part), "{part:?} not in {message:?}");
    }
    assert!(
        read_tree(&out).is_empty(),
        "nothing may be written on error"
    );
}

#[test]
fn demo_renders_deterministically_and_removes_stale_files() {
    let first = tempfile::tempdir().unwrap();
    let second = tempfile::tempdir().unwrap();
    for out in [&first, &second] {
        let output = kiln(&[
            "render",
            "-f",
            demo().to_str().unwrap(),
            "--out",
            out.path().to_str().unwrap(),
        ]);
        assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    }
    let tree = read_tree(first.path());
    assert_eq!(
        tree,
        read_tree(second.path()),
        "two renders, identical bytes"
    );
    assert!(tree.contains_key("kustomization.yaml"));
    assert!(tree.contains_key("web/kustomization.yaml"));
    assert!(tree.contains_key("web/acme/app.yaml"));
    assert!(
        tree.contains_key("web/acme/ingress.yaml"),
        "pro tenants get an ingress"
    );
    assert!(tree.contains_key("web/initech/app.yaml"));
    assert!(
        !tree.contains_key("web/initech/ingress.yaml"),
        "free tenants do not"
    );
    assert!(
        !tree.keys().any(|k| k.starts_with("web/tyrell/")),
        "inactive tenants are not rendered"
    );

    // A file an earlier render wrote that is no longer rendered goes away;
    // files outside Kiln's directories stay.
    let stale = first.path().join("web/acme/old.yaml");
    std::fs::write(&stale, "x").unwrap();
    std::fs::create_dir_all(first.path().join("web/gone")).unwrap();
    std::fs::write(first.path().join("web/gone/app.yaml"), "x").unwrap();
    std::fs::write(first.path().join("README.md"), "mine").unwrap();
    let output = kiln(&[
        "render",
        "-f",
        demo().to_str().unwrap(),
        "--out",
        first.path().to_str().unwrap(),
        "--format",
        "json",
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(summary["removed"], serde_json::json!(["web/gone"]));
    assert_eq!(summary["changed"], serde_json::json!(["web/acme"]));
    assert_eq!(summary["written"], 0, "unchanged files are not rewritten");
    assert!(!stale.exists());
    assert!(!first.path().join("web/gone").exists());
    assert!(first.path().join("README.md").exists());
}

#[test]
fn an_unchanged_directory_skips_the_render_and_anything_else_renders_again() {
    let dir = project(&[
        ("source.yaml", SOURCE),
        ("tenants.json", TENANTS),
        ("bp.yaml", &blueprint(CONFIG_MAP)),
    ]);
    let out = dir.path().join("out");
    let fresh = dir.path().join("fresh");
    // The memo lives in the cache directory, never in the tree.
    let cache = dir.path().join("cache");
    let render = |target: &Path| {
        let output = common::kiln_command()
            .args([
                "render",
                "-f",
                dir.path().to_str().unwrap(),
                "--out",
                target.to_str().unwrap(),
            ])
            .arg("--allow-mass-delete")
            .env("XDG_CACHE_HOME", &cache)
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
        stderr(&output)
    };
    // Each step's tree must be what a render into an empty directory gives.
    let same_as_fresh = |what: &str| {
        let _ = std::fs::remove_dir_all(&fresh);
        render(&fresh);
        assert_eq!(read_tree(&out), read_tree(&fresh), "{what}");
    };
    let skipped =
        |log: &str| log.contains("0 changed, 0 removed, 2 unchanged; 2 objects, 0 files written");
    render(&out);
    let memos: Vec<_> = std::fs::read_dir(cache.join("kiln/render-out"))
        .unwrap()
        .collect();
    assert_eq!(memos.len(), 1, "one memo, in the cache directory");
    let memo = memos[0].as_ref().unwrap().path();
    let file = out.join("web/acme/config.yaml");
    let written = std::fs::metadata(&file).unwrap().modified().unwrap();
    let log = KilnLog::of(dir.path(), &out, &cache);
    assert!(skipped(&log.0), "{}", log.0);
    assert!(
        log.1.contains("the directory holds this render already"),
        "{}",
        log.1
    );
    assert_eq!(
        std::fs::metadata(&file).unwrap().modified().unwrap(),
        written
    );
    same_as_fresh("nothing changed");

    // A hand edit of the same length, a deleted file, a stray file in an
    // instance directory: each renders again and is put right.
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, text.replace("pro", "PRO")).unwrap();
    let log = KilnLog::of(dir.path(), &out, &cache);
    assert!(!log.1.contains("holds this render already"), "{}", log.1);
    same_as_fresh("an edited file");
    std::fs::remove_file(&file).unwrap();
    render(&out);
    same_as_fresh("a deleted file");
    std::fs::write(out.join("web/acme/stray.yaml"), "x").unwrap();
    render(&out);
    assert!(!out.join("web/acme/stray.yaml").exists());
    same_as_fresh("a stray file");

    // Changed rows and a changed template render again.
    std::fs::write(
        dir.path().join("tenants.json"),
        TENANTS.replace("\"pro\"", "\"gold\""),
    )
    .unwrap();
    let log = render(&out);
    assert!(log.contains("1 changed"), "{log}");
    same_as_fresh("a changed row");
    std::fs::write(
        dir.path().join("bp.yaml"),
        blueprint(&CONFIG_MAP.replace("plan:", "tier:")),
    )
    .unwrap();
    let log = render(&out);
    assert!(log.contains("2 changed"), "{log}");
    same_as_fresh("a changed template");

    // A memo that is garbage, or from another version of the inputs, costs
    // a render, never a wrong tree.
    std::fs::write(&memo, "kiln render --out memo 1\nnonsense\n").unwrap();
    let log = KilnLog::of(dir.path(), &out, &cache);
    assert!(!log.1.contains("holds this render already"), "{}", log.1);
    same_as_fresh("a corrupt memo");
}

/// A render into `out` with Kiln's debug log: (stderr summary, log).
struct KilnLog(String, String);

impl KilnLog {
    fn of(config: &Path, out: &Path, cache: &Path) -> Self {
        let output = common::kiln_command()
            .env("XDG_CACHE_HOME", cache)
            .args([
                "render",
                "-f",
                config.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ])
            .env("KILN_LOG", "kiln=debug")
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
        let all = stderr(&output);
        let summary = all
            .lines()
            .filter(|l| l.starts_with("rendered "))
            .collect::<Vec<_>>()
            .join("\n");
        KilnLog(summary, all)
    }
}

#[test]
fn values_keep_their_types_and_inactive_rows_are_skipped() {
    let resources = "  - id: config\n    template: |\n      apiVersion: v1\n      kind: ConfigMap\n      metadata: {name: cfg}\n      data:\n        replicas: \"{{ row.replicas }}\"\n      binaryData: {}\n      immutable: {{ row.note is none }}\n      note: {{ row.note }}\n";
    let dir = project(&[
        ("source.yaml", SOURCE),
        ("tenants.json", TENANTS),
        ("bp.yaml", &blueprint(resources)),
    ]);
    let out = dir.path().join("out");
    let output = kiln(&[
        "render",
        "-f",
        dir.path().to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let tree = read_tree(&out);
    let acme = String::from_utf8(tree["web/acme/config.yaml"].clone()).unwrap();
    assert!(acme.contains("immutable: true\n"), "{acme}");
    assert!(
        acme.contains("note: null\n"),
        "NULL renders as null: {acme}"
    );
    assert!(acme.contains("namespace: tenant-acme\n"), "{acme}");
    assert!(
        tree.contains_key("web/globex/config.yaml"),
        "active: yes counts"
    );
    assert!(
        !tree.keys().any(|k| k.contains("initech")),
        "active: false does not"
    );
}

#[test]
fn broken_template_is_refused() {
    let bad = "  - id: config\n    template: \"{% if %}\"\n";
    assert_refused(
        &[
            ("source.yaml", SOURCE),
            ("tenants.json", TENANTS),
            ("bp.yaml", &blueprint(bad)),
        ],
        &[
            "bp.yaml",
            "Blueprint web",
            "web/config (inline)",
            "does not compile",
        ],
    );
}

#[test]
fn a_template_kept_in_a_configmap_is_for_the_controller_only() {
    let from = "  - id: config\n    templateFrom: {configMapKeyRef: {name: templates, key: config.yaml}}\n";
    assert_refused(
        &[
            ("source.yaml", SOURCE),
            ("tenants.json", TENANTS),
            ("bp.yaml", &blueprint(from)),
        ],
        &[
            "bp.yaml",
            "Blueprint web",
            "spec.resources[0] (id config)",
            "templateFrom",
            "kiln controller",
        ],
    );
    let both =
        "  - id: config\n    template: x\n    templateFrom: {configMapKeyRef: {name: t, key: k}}\n";
    assert_refused(
        &[
            ("source.yaml", SOURCE),
            ("tenants.json", TENANTS),
            ("bp.yaml", &blueprint(both)),
        ],
        &["set one of template, templateFile and templateFrom"],
    );
}

#[test]
fn a_pipeline_service_account_is_for_the_controller_only() {
    assert_refused(
        &[
            ("source.yaml", SOURCE),
            ("tenants.json", TENANTS),
            ("bp.yaml", &blueprint(CONFIG_MAP)),
            (
                "pipeline.yaml",
                "apiVersion: kiln.dev/v1alpha1\nkind: Pipeline\nmetadata: {name: main}\nspec: {serviceAccountName: deployer}\n",
            ),
        ],
        &[
            "pipeline.yaml",
            "Pipeline main",
            "spec.serviceAccountName",
            "kiln controller",
        ],
    );
}

#[test]
fn notify_is_for_postgres_sources_on_an_identifier() {
    let with =
        |notify: &str| SOURCE.replace("  key: id\n", &format!("  key: id\n  notify: {notify}\n"));
    assert_refused(
        &[
            ("source.yaml", &with("{channel: tenants}")),
            ("tenants.json", TENANTS),
            ("bp.yaml", &blueprint(CONFIG_MAP)),
        ],
        &[
            "source.yaml",
            "Source tenants",
            "spec.notify is for PostgreSQL sources",
        ],
    );
    let postgres = with("{channel: \"drop table\"}").replace(
        "url: file:tenants.json",
        "url: postgres://kiln@127.0.0.1:1/tenants",
    );
    assert_refused(
        &[
            ("source.yaml", &postgres),
            ("bp.yaml", &blueprint(CONFIG_MAP)),
        ],
        &[
            "source.yaml",
            "spec.notify.channel \"drop table\" must be a PostgreSQL identifier",
        ],
    );
}

#[test]
fn missing_column_names_blueprint_resource_row_and_line() {
    let bad = "  - id: config\n    templateFile: t/config.yaml.j2\n";
    assert_refused(
        &[
            ("source.yaml", SOURCE),
            ("tenants.json", TENANTS),
            ("bp.yaml", &blueprint(bad)),
            (
                "t/config.yaml.j2",
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata:\n  a: \"{{ row.region }}\"\n",
            ),
        ],
        &[
            "blueprint web",
            "resource config",
            "row acme",
            "undefined variable row.region",
            "t/config.yaml.j2:5",
        ],
    );
}

#[test]
fn a_missing_column_through_a_filter_is_refused_too() {
    for filter in [
        "quote",
        "to_json",
        "to_yaml",
        "dns_label",
        "sha256",
        "b64encode",
        "lower",
        "int",
    ] {
        let template = format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: c}}\ndata:\n  a: \"{{{{ row.regoin | {filter} }}}}\"\n"
        );
        let dir = project(&[
            ("source.yaml", SOURCE),
            ("tenants.json", TENANTS),
            (
                "bp.yaml",
                &blueprint("  - id: config\n    templateFile: t.j2\n"),
            ),
            ("t.j2", &template),
        ]);
        let out = dir.path().join("out");
        let output = render_out(dir.path(), &out, &[]);
        let message = stderr(&output);
        assert_eq!(output.status.code(), Some(2), "{filter}: {message}");
        assert!(
            message.contains("row acme") && message.contains("undefined"),
            "{filter}: {message}"
        );
        assert!(message.contains("t.j2:5"), "{filter}: {message}");
    }
}

#[test]
fn duplicate_key_is_refused() {
    let tenants = r#"[{"id": "acme", "plan": "pro", "active": true}, {"id": "acme", "plan": "free", "active": true}]"#;
    assert_refused(
        &[
            ("source.yaml", SOURCE),
            ("tenants.json", tenants),
            ("bp.yaml", &blueprint(CONFIG_MAP)),
        ],
        &["source tenants", "duplicate key acme"],
    );
}

#[test]
fn null_key_is_refused() {
    let tenants = r#"[{"id": null, "plan": "pro", "active": true}]"#;
    assert_refused(
        &[
            ("source.yaml", SOURCE),
            ("tenants.json", tenants),
            ("bp.yaml", &blueprint(CONFIG_MAP)),
        ],
        &["source tenants", "NULL key"],
    );
}

#[test]
fn dependency_cycle_is_refused() {
    let bad = "  - id: a\n    dependsOn: [b]\n    template: x\n  - id: b\n    dependsOn: [a]\n    template: x\n";
    assert_refused(
        &[
            ("source.yaml", SOURCE),
            ("tenants.json", TENANTS),
            ("bp.yaml", &blueprint(bad)),
        ],
        &[
            "bp.yaml",
            "Blueprint web",
            "dependency cycle between resources a, b",
        ],
    );
}

#[test]
fn invalid_configuration_yaml_is_refused() {
    assert_refused(
        &[(
            "source.yaml",
            "apiVersion: kiln.dev/v1alpha1\nkind: Source\nmetadata: {name: [\n",
        )],
        &["invalid YAML in", "source.yaml"],
    );
}

#[test]
fn template_output_that_is_not_one_object_is_refused() {
    let bad = "  - id: config\n    template: \"- a\\n- b\\n\"\n";
    assert_refused(
        &[
            ("source.yaml", SOURCE),
            ("tenants.json", TENANTS),
            ("bp.yaml", &blueprint(bad)),
        ],
        &[
            "blueprint web",
            "resource config",
            "row acme",
            "not a mapping",
        ],
    );
    let two = "  - id: config\n    template: \"apiVersion: v1\\nkind: ConfigMap\\nmetadata: {name: a}\\n---\\napiVersion: v1\\nkind: ConfigMap\\nmetadata: {name: b}\\n\"\n";
    assert_refused(
        &[
            ("source.yaml", SOURCE),
            ("tenants.json", TENANTS),
            ("bp.yaml", &blueprint(two)),
        ],
        &["resource config", "rendered 2 YAML documents"],
    );
    let nameless =
        "  - id: config\n    template: \"apiVersion: v1\\nkind: ConfigMap\\nmetadata: {}\\n\"\n";
    assert_refused(
        &[
            ("source.yaml", SOURCE),
            ("tenants.json", TENANTS),
            ("bp.yaml", &blueprint(nameless)),
        ],
        &["resource config", "no metadata.name"],
    );
}

#[test]
fn lists_and_names_that_are_not_path_segments_are_refused() {
    // A List would carry a Secret (or anything) past the checks made on one
    // object: its items get no labels, no namespace, no guard.
    let list = "  - id: config\n    template: |\n      apiVersion: v1\n      kind: List\n      metadata: {name: l}\n      items:\n      - {apiVersion: v1, kind: Secret, metadata: {name: s}, stringData: {password: hunter2}}\n";
    let typed_list = list.replace("kind: List", "kind: SecretList");
    let items = list.replace("kind: List", "kind: ConfigMap");
    for (template, kind) in [
        (list, "List"),
        (typed_list.as_str(), "SecretList"),
        (items.as_str(), "ConfigMap"),
    ] {
        assert_refused(
            &[
                ("source.yaml", SOURCE),
                ("tenants.json", TENANTS),
                ("bp.yaml", &blueprint(template)),
            ],
            &[
                "blueprint web",
                "resource config",
                "row acme",
                &format!("is a {kind}"),
                "never a list",
            ],
        );
    }
    for (name, why) in [
        ("\"../../etc\"", "contains '/'"),
        ("\"a..b\"", "contains '..'"),
        ("\"a%2fb\"", "contains '/' or '%'"),
        ("\"a b\"", "white space"),
    ] {
        let template = format!(
            "  - id: config\n    template: |\n      apiVersion: v1\n      kind: ConfigMap\n      metadata: {{name: {name}}}\n"
        );
        assert_refused(
            &[
                ("source.yaml", SOURCE),
                ("tenants.json", TENANTS),
                ("bp.yaml", &blueprint(&template)),
            ],
            &["resource config", "row acme", "metadata.name", why],
        );
    }
    let namespace = "  - id: config\n    template: |\n      apiVersion: v1\n      kind: ConfigMap\n      metadata: {name: c, namespace: \"../kube-system\"}\n";
    assert_refused(
        &[
            ("source.yaml", SOURCE),
            ("tenants.json", TENANTS),
            ("bp.yaml", &blueprint(namespace)),
        ],
        &[
            "resource config",
            "row acme",
            "metadata.namespace",
            "DNS label",
        ],
    );
    let from_row = blueprint(CONFIG_MAP).replace("tenant-{{ key }}", "{{ row.plan }}/x");
    assert_refused(
        &[
            ("source.yaml", SOURCE),
            ("tenants.json", TENANTS),
            ("bp.yaml", &from_row),
        ],
        &["row acme", "spec.namespace", "\"pro/x\" is not a DNS label"],
    );
}

#[test]
fn unreachable_database_is_refused_without_printing_the_password() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let source = format!(
        "apiVersion: kiln.dev/v1alpha1\nkind: Source\nmetadata: {{name: tenants}}\nspec:\n  url: postgres://kiln:hunter2@127.0.0.1:{port}/app\n  query: SELECT 1 AS id\n  key: id\n"
    );
    let dir = project(&[
        ("source.yaml", &source),
        ("bp.yaml", &blueprint(CONFIG_MAP)),
    ]);
    let output = kiln(&["render", "-f", dir.path().to_str().unwrap()]);
    let message = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{message}");
    assert!(
        message.contains("source tenants: cannot connect"),
        "{message}"
    );
    assert!(!message.contains("hunter2"), "{message}");
}

#[test]
fn unknown_kind_field_and_dangling_reference_are_refused() {
    assert_refused(
        &[(
            "a.yaml",
            "apiVersion: kiln.dev/v1alpha1\nkind: Sauce\nmetadata: {name: x}\nspec: {}\n",
        )],
        &["a.yaml", "document 1", "unknown kind Sauce"],
    );
    let typo = "  - id: config\n    templte: x\n";
    assert_refused(
        &[
            ("source.yaml", SOURCE),
            ("tenants.json", TENANTS),
            ("bp.yaml", &blueprint(typo)),
        ],
        &[
            "bp.yaml",
            "Blueprint web",
            "spec.resources[0]",
            "unknown field `templte`",
        ],
    );
    let long_name = blueprint(CONFIG_MAP).replace("name: web", "name: Web_App");
    assert_refused(
        &[
            ("source.yaml", SOURCE),
            ("tenants.json", TENANTS),
            ("bp.yaml", &long_name),
        ],
        &["bp.yaml", "Blueprint Web_App", "must be a DNS label"],
    );
    let dangling = blueprint(CONFIG_MAP).replace("source: tenants", "source: customers");
    assert_refused(
        &[
            ("source.yaml", SOURCE),
            ("tenants.json", TENANTS),
            ("bp.yaml", &dangling),
        ],
        &[
            "bp.yaml",
            "Blueprint web",
            "spec.source: no Source named customers",
        ],
    );
}

#[test]
fn the_same_object_from_two_rows_is_refused() {
    let clash = "  - id: ns\n    template: |\n      apiVersion: v1\n      kind: Namespace\n      metadata: {name: shared}\n";
    assert_refused(
        &[
            ("source.yaml", SOURCE),
            ("tenants.json", TENANTS),
            ("bp.yaml", &blueprint(clash)),
        ],
        &[
            "Namespace shared is rendered twice",
            "row acme, resource ns",
            "row globex, resource ns",
        ],
    );
}

#[test]
fn keys_that_collide_as_dns_labels_are_refused() {
    let tenants = r#"[{"id": "Acme", "plan": "pro", "active": true}, {"id": "acme", "plan": "free", "active": true}]"#;
    let per_key = "  - id: config\n    template: |\n      apiVersion: v1\n      kind: ConfigMap\n      metadata: {name: \"c-{{ key }}\"}\n";
    assert_refused(
        &[
            ("source.yaml", SOURCE),
            ("tenants.json", tenants),
            (
                "bp.yaml",
                &blueprint(per_key).replace(
                    "{{ key }}\"\n  resources",
                    "{{ key | dns_label }}\"\n  resources",
                ),
            ),
        ],
        &["rows Acme and acme both map to instance acme"],
    );
}

#[test]
fn validate_reports_every_problem() {
    let bad = "  - id: a\n    dependsOn: [missing]\n    template: x\n  - id: b\n    template: \"{{ row.nope }}\"\n";
    let dir = project(&[
        ("source.yaml", SOURCE),
        ("tenants.json", TENANTS),
        ("bp.yaml", &blueprint(bad)),
        (
            "other.yaml",
            &blueprint("  - id: c\n    template: \"{% for %}\"\n")
                .replace("name: web", "name: other"),
        ),
    ]);
    let output = kiln(&["validate", "-f", dir.path().to_str().unwrap()]);
    let message = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{message}");
    assert!(
        message.contains("resource a depends on missing"),
        "{message}"
    );
    assert!(
        message.contains("Blueprint other: template other/c (inline) does not compile"),
        "{message}"
    );

    let dir = project(&[
        ("source.yaml", SOURCE),
        ("tenants.json", TENANTS),
        (
            "bp.yaml",
            &blueprint("  - id: b\n    template: \"{{ row.nope }}\"\n"),
        ),
    ]);
    let output = kiln(&[
        "validate",
        "-f",
        dir.path().to_str().unwrap(),
        "--sample",
        "2",
    ]);
    let message = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{message}");
    assert!(
        message.contains("row acme") && message.contains("row globex"),
        "every sampled row: {message}"
    );

    let output = kiln(&["validate", "-f", demo().to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
}

#[test]
fn a_runaway_template_fails_instead_of_hanging() {
    let nested = "  - id: config\n    template: |\n      {% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}\n";
    assert_refused(
        &[
            ("source.yaml", SOURCE),
            ("tenants.json", TENANTS),
            ("bp.yaml", &blueprint(nested)),
        ],
        &[
            "blueprint web",
            "resource config",
            "row acme",
            "more than 10000000 instructions",
            "spec.limits.fuel",
        ],
    );
    let huge = "  - id: config\n    template: |\n      {% for i in range(100000) %}{{ row.plan }}{{ range(100) | join(',') }}{% endfor %}\n";
    assert_refused(
        &[
            ("source.yaml", SOURCE),
            ("tenants.json", TENANTS),
            ("bp.yaml", &blueprint(huge)),
        ],
        &["resource config", "row acme", "more than 1048576 bytes"],
    );
    // The Blueprint sets its own budget.
    let small =
        blueprint(CONFIG_MAP).replace("  resources:\n", "  limits: {fuel: 3}\n  resources:\n");
    assert_refused(
        &[
            ("source.yaml", SOURCE),
            ("tenants.json", TENANTS),
            ("bp.yaml", &small),
        ],
        &["blueprint web", "row acme", "more than 3 instructions"],
    );
    // A flag raises it for one run.
    let dir = project(&[
        ("source.yaml", SOURCE),
        ("tenants.json", TENANTS),
        ("bp.yaml", &small),
    ]);
    let output = kiln(&[
        "render",
        "-f",
        dir.path().to_str().unwrap(),
        "--fuel",
        "100000",
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
}

#[test]
fn a_render_has_an_output_budget_per_blueprint() {
    // 400 kB per object, well under the 1 MiB an object may take; two rows
    // pass the render's 500 kB.
    let big = "  - id: config\n    template: |\n      apiVersion: v1\n      kind: ConfigMap\n      metadata: {name: cfg}\n      data: {blob: \"{% for i in range(40000) %}0123456789{% endfor %}\"}\n";
    let limited = blueprint(big).replace(
        "  resources:\n",
        "  limits: {maxRenderBytes: 500000}\n  resources:\n",
    );
    let files = [
        ("source.yaml", SOURCE),
        ("tenants.json", TENANTS),
        ("bp.yaml", limited.as_str()),
    ];
    assert_refused(
        &files,
        &[
            "blueprint web",
            "resource config",
            "row globex",
            "passed 500000 bytes in this render",
            "spec.limits.maxRenderBytes",
        ],
    );
    let dir = project(&files);
    let output = kiln(&["validate", "-f", dir.path().to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("passed 500000 bytes"),
        "{}",
        stderr(&output)
    );
    let out = dir.path().join("out");
    let output = render_out(dir.path(), &out, &["--max-render-bytes", "1000000"]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(read_tree(&out).contains_key("web/globex/config.yaml"));
}

#[test]
fn blueprints_are_selected_by_flag_by_pipeline_and_by_a_pipelines_list() {
    let api = blueprint(CONFIG_MAP)
        .replace("name: web", "name: api")
        .replace("name: cfg", "name: api-cfg");
    let dir = project(&[
        ("source.yaml", SOURCE),
        ("tenants.json", TENANTS),
        ("web.yaml", &blueprint(CONFIG_MAP)),
        ("api.yaml", &api),
    ]);
    let d = dir.path().to_str().unwrap();
    // Which blueprints' objects a render printed.
    let rendered = |extra: &[&str]| {
        let mut args = vec!["render", "-f", d];
        args.extend_from_slice(extra);
        let out = kiln(&args);
        assert!(out.status.success(), "{extra:?}: {}", stderr(&out));
        let text = stdout(&out);
        let mut found: Vec<&str> = ["web", "api"]
            .into_iter()
            .filter(|b| text.contains(&format!("kiln.dev/blueprint: {b}")))
            .collect();
        found.sort_unstable();
        found
    };
    assert_eq!(rendered(&[]), ["api", "web"]);
    assert_eq!(rendered(&["--blueprint", "api"]), ["api"]);
    assert_eq!(rendered(&["--blueprint", "web"]), ["web"]);
    let out = kiln(&["render", "-f", d, "--blueprint", "nope"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("--blueprint nope"),
        "{}",
        stderr(&out)
    );

    // Pipelines name their blueprints; --pipeline picks one.
    std::fs::write(
        dir.path().join("pipelines.yaml"),
        "apiVersion: kiln.dev/v1alpha1\nkind: Pipeline\nmetadata: {name: front}\nspec: {blueprints: [web]}\n---\n\
         apiVersion: kiln.dev/v1alpha1\nkind: Pipeline\nmetadata: {name: back}\nspec: {blueprints: [api]}\n",
    )
    .unwrap();
    assert_eq!(rendered(&["--pipeline", "front"]), ["web"]);
    assert_eq!(rendered(&["--pipeline", "back"]), ["api"]);
    // --blueprint wins over the Pipeline's list.
    assert_eq!(
        rendered(&["--pipeline", "front", "--blueprint", "api"]),
        ["api"]
    );
    // One Pipeline: its list applies without --pipeline.
    std::fs::write(
        dir.path().join("pipelines.yaml"),
        "apiVersion: kiln.dev/v1alpha1\nkind: Pipeline\nmetadata: {name: back}\nspec: {blueprints: [api]}\n",
    )
    .unwrap();
    assert_eq!(rendered(&[]), ["api"]);
}

/// `kiln render -f DIR` (to stdout) with extra environment.
fn render_with_env(dir: &Path, env: &[(&str, &str)]) -> Output {
    let mut command = common::kiln_command();
    command.args(["render", "-f", dir.to_str().unwrap()]);
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().unwrap()
}

#[test]
fn a_source_url_from_the_environment_is_read_and_its_absence_named() {
    let source = SOURCE.replace("url: file:tenants.json", "urlFrom: {env: TENANTS_ROWS_URL}");
    let dir = project(&[
        ("source.yaml", &source),
        ("rows.json", TENANTS),
        ("bp.yaml", &blueprint(CONFIG_MAP)),
    ]);
    let out = render_with_env(dir.path(), &[("TENANTS_ROWS_URL", "file:rows.json")]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("namespace: tenant-acme"),
        "{}",
        stdout(&out)
    );
    let out = render_with_env(dir.path(), &[]);
    assert_eq!(out.status.code(), Some(2));
    let message = stderr(&out);
    assert_eq!(message.trim_end().lines().count(), 1, "{message}");
    assert!(
        message.contains("TENANTS_ROWS_URL") && message.contains("tenants"),
        "{message}"
    );
}

#[test]
fn a_seed_file_that_fails_leaves_no_database_behind() {
    let source = "apiVersion: kiln.dev/v1alpha1\nkind: Source\nmetadata: {name: tenants}\n\
                  spec: {url: \"sqlite:tenants.db\", seedFile: seed.sql, query: \"SELECT id, 'pro' AS plan FROM tenants\", key: id}\n";
    let dir = project(&[
        ("source.yaml", source),
        (
            "seed.sql",
            "CREATE TABLE tenants (id TEXT);\nINSERT INTO tenants VALUES ('a');\nINSERT INTO nowhere VALUES (1);\n",
        ),
        ("bp.yaml", &blueprint(CONFIG_MAP)),
    ]);
    let out = render_with_env(dir.path(), &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let message = stderr(&out);
    assert!(
        message.contains("source tenants") && message.contains("nowhere"),
        "{message}"
    );
    let left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("tenants.db"))
        .collect();
    assert!(left.is_empty(), "a failed seed left {left:?}");
    // Fixed, the next render creates it.
    std::fs::write(
        dir.path().join("seed.sql"),
        "CREATE TABLE tenants (id TEXT);\nINSERT INTO tenants VALUES ('a');\n",
    )
    .unwrap();
    let out = render_with_env(dir.path(), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(dir.path().join("tenants.db").exists());
}

#[test]
fn the_same_object_from_two_blueprints_is_an_error_naming_both() {
    let fixed = CONFIG_MAP.replace(
        "metadata: {name: cfg}",
        "metadata: {name: \"cfg-{{ key }}\", namespace: shared}",
    );
    let other = blueprint(&fixed).replace("name: web", "name: api");
    assert_refused(
        &[
            ("source.yaml", SOURCE),
            ("tenants.json", TENANTS),
            ("web.yaml", &blueprint(&fixed)),
            ("api.yaml", &other),
        ],
        &[
            "ConfigMap shared/cfg-acme",
            "blueprint web",
            "blueprint api",
        ],
    );
}

#[test]
fn render_out_refuses_a_mass_deletion_and_keeps_the_directory() {
    let dir = project(&[
        ("source.yaml", SOURCE),
        ("tenants.json", TENANTS),
        ("bp.yaml", &blueprint(CONFIG_MAP)),
    ]);
    let out = dir.path().join("out");
    let first = render_out(dir.path(), &out, &[]);
    assert!(first.status.success(), "{}", stderr(&first));
    let before = read_tree(&out);
    // Both active rows gone: every instance would be removed.
    std::fs::write(
        dir.path().join("tenants.json"),
        r#"[{"id": "acme", "plan": "pro", "active": false}]"#,
    )
    .unwrap();
    let refused = render_out(dir.path(), &out, &[]);
    assert_eq!(refused.status.code(), Some(2));
    let message = stderr(&refused);
    assert!(
        message.contains("refusing to remove all 2 instances")
            && message.contains("--allow-mass-delete"),
        "{message}"
    );
    assert_eq!(read_tree(&out), before, "a refused render wrote");
    let allowed = render_out(dir.path(), &out, &["--allow-mass-delete"]);
    assert!(allowed.status.success(), "{}", stderr(&allowed));
    assert!(!read_tree(&out).keys().any(|p| p.starts_with("web/acme/")));
}

#[test]
fn the_parallel_render_is_the_same_on_one_core_and_on_all_in_any_time_zone_and_locale() {
    let dir = tempfile::tempdir().unwrap();
    let config = common::tenants(
        dir.path(),
        "det",
        240,
        "  - id: config\n    template: |\n      apiVersion: v1\n      kind: ConfigMap\n      metadata: {name: cfg}\n      data: {key: \"{{ key }}\", upper: \"{{ key | upper }}\", n: \"{{ loop is defined }}\"}\n",
    );
    let render = |out: &Path, one_core: bool, tz: &str, lang: &str| {
        let mut command = if one_core {
            // One CPU in the affinity mask: one render thread.
            let mut c = std::process::Command::new("taskset");
            c.args(["-c", "0", env!("CARGO_BIN_EXE_kiln")]);
            for (name, _) in std::env::vars_os() {
                if name.to_string_lossy().starts_with("KILN_") {
                    c.env_remove(name);
                }
            }
            c
        } else {
            common::kiln_command()
        };
        let output = command
            .args(["render", "-f"])
            .arg(&config)
            .arg("--out")
            .arg(out)
            .env("TZ", tz)
            .env("LANG", lang)
            .env("LC_ALL", lang)
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", stderr(&output));
        read_tree(out)
    };
    let one = render(&dir.path().join("one"), true, "UTC", "C");
    let all = render(
        &dir.path().join("all"),
        false,
        "Asia/Kolkata",
        "de_DE.UTF-8",
    );
    let again = render(
        &dir.path().join("again"),
        false,
        "America/St_Johns",
        "tr_TR.UTF-8",
    );
    assert_eq!(
        one.len(),
        240 * 3 + 2,
        "{:?}",
        one.keys().take(5).collect::<Vec<_>>()
    );
    assert!(
        one == all,
        "one core and all cores rendered different trees"
    );
    assert!(all == again, "two renders on all cores differ");
}

#[test]
fn a_dependency_that_rendered_nothing_passes_on_its_own_dependencies() {
    let resources = "  - id: base\n    template: |\n      apiVersion: v1\n      kind: ConfigMap\n      metadata: {name: base}\n\
                     \x20\x20- id: extra\n    dependsOn: [base]\n    template: |\n      {% if row.plan == 'pro' %}\n      apiVersion: v1\n      kind: ConfigMap\n      metadata: {name: extra}\n      {% endif %}\n\
                     \x20\x20- id: last\n    dependsOn: [extra]\n    template: |\n      apiVersion: v1\n      kind: ConfigMap\n      metadata: {name: last}\n";
    let dir = project(&[
        ("source.yaml", SOURCE),
        ("tenants.json", TENANTS),
        ("bp.yaml", &blueprint(resources)),
    ]);
    let out = render_out(dir.path(), &dir.path().join("out"), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let tree = read_tree(&dir.path().join("out"));
    let file = |path: &str| String::from_utf8(tree[path].clone()).unwrap();
    // acme is on the pro plan: `extra` rendered, and `last` waits for it.
    let acme = file("web/acme/last.yaml");
    assert!(acme.contains("kiln.dev/depends-on: extra"), "{acme}");
    // globex is not: `last` waits for what `extra` waited for, in the
    // same sync wave as ever.
    assert!(!tree.contains_key("web/globex/extra.yaml"));
    let globex = file("web/globex/last.yaml");
    assert!(globex.contains("kiln.dev/depends-on: base"), "{globex}");
    assert!(
        globex.contains("argocd.argoproj.io/sync-wave: \"2\""),
        "{globex}"
    );
}

/// A Pipeline with a rollout over 40 tenants, 4 of them internal.
fn rollout_project(waves: &str) -> tempfile::TempDir {
    let tenants: Vec<String> = (0..40)
        .map(|i| {
            let tier = if i % 10 == 3 { "internal" } else { "pro" };
            format!(r#"{{"id": "t{i:02}", "plan": "{tier}", "active": true}}"#)
        })
        .collect();
    let pipeline = format!(
        "apiVersion: kiln.dev/v1alpha1\nkind: Pipeline\nmetadata: {{name: prod}}\nspec:\n  rollout:\n    onFailure: Rollback\n    waves:\n{waves}"
    );
    project(&[
        ("source.yaml", SOURCE),
        ("tenants.json", &format!("[{}]", tenants.join(",\n"))),
        ("bp.yaml", &blueprint(CONFIG_MAP)),
        ("pipeline.yaml", &pipeline),
    ])
}

#[test]
fn rollout_plan_shows_each_waves_instances_in_order_and_names_a_wrong_strategy() {
    let dir = rollout_project(concat!(
        "    - {name: canary, instances: [t13]}\n",
        "    - {name: early, select: \"row.plan == 'internal'\", maxConcurrent: 2}\n",
        "    - {name: ten-percent, percent: 10, gates: [{approval: {}}]}\n",
        "    - {name: rest, quorum: 95%, gates: [{window: {days: Sat-Sun, from: \"00:00\", to: \"00:01\", timeZone: Pacific/Kiritimati}}]}\n",
    ));
    let d = dir.path().to_str().unwrap();
    let output = kiln(&["rollout", "plan", "-f", d, "--format", "json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let plan: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let waves = plan["waves"].as_array().unwrap();
    let keys = |w: &serde_json::Value| -> Vec<String> {
        w["instances"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k.as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(keys(&waves[0]), ["web/t13"]);
    assert_eq!(keys(&waves[1]), ["web/t03", "web/t23", "web/t33"]);
    assert_eq!(waves[1]["maxConcurrent"], 2);
    assert_eq!(waves[2]["count"], 4, "10% of 40, rounded up");
    assert_eq!(waves[3]["count"], 32);
    assert_eq!(waves[3]["healthyNeeded"], 31, "95% of 32, rounded up");
    assert_eq!(plan["onFailure"], "Rollback");
    // Every instance is in exactly one wave.
    let mut all: Vec<String> = waves.iter().flat_map(keys).collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 40);
    // The same rows give the same plan, and the text names the waves.
    let again = kiln(&["rollout", "plan", "-f", d, "--format", "json"]);
    assert_eq!(output.stdout, again.stdout);
    let text = kiln(&["rollout", "plan", "-f", d]);
    let text = stdout(&text);
    assert!(
        text.contains(
            "wave 2 early: 3 instances (select \"row.plan == 'internal'\"), at most 2 at once"
        ),
        "{text}"
    );
    assert!(text.contains("gate approval"), "{text}");
    assert!(
        text.contains("gate window: Sat-Sun 00:00-00:01 Pacific/Kiritimati"),
        "{text}"
    );

    // A canary key no row has, and a broken window, are named: exit 2.
    for (waves, expected) in [
        (
            "    - {name: canary, instances: [t99]}\n    - {name: rest}\n",
            "pipeline.yaml: Pipeline prod: spec.rollout: wave canary: no instance has the key \"t99\"",
        ),
        (
            "    - {name: rest, gates: [{window: {from: \"9:00\", to: \"16:00\"}}]}\n",
            "pipeline.yaml: Pipeline prod: spec.rollout: wave rest: gates[0]: window.from: \"9:00\" is not a time like 09:00",
        ),
        (
            "    - {name: canary, instances: [t01]}\n",
            "the last wave (canary) must take every remaining instance",
        ),
    ] {
        let dir = rollout_project(waves);
        let output = kiln(&["rollout", "plan", "-f", dir.path().to_str().unwrap()]);
        let message = stderr(&output);
        assert_eq!(output.status.code(), Some(2), "{message}");
        assert_eq!(message.trim_end().lines().count(), 1, "one line: {message}");
        assert!(
            message.contains(expected),
            "{expected:?} not in {message:?}"
        );
    }
}

#[test]
fn render_git_refuses_a_pipeline_with_a_rollout_rather_than_commit_every_instance_at_once() {
    let dir = rollout_project("    - {name: canary, instances: [t01]}\n    - {name: rest}\n");
    let d = dir.path().to_str().unwrap();
    let repo = dir.path().join("repo");
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(&repo)
            .args(args)
            .output()
            .unwrap()
    };
    std::fs::create_dir_all(&repo).unwrap();
    assert!(git(&["init", "-q"]).status.success());
    {
        let args = ["render", "-f", d, "--git", repo.to_str().unwrap()];
        let output = kiln(&args);
        let message = stderr(&output);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {message}");
        assert!(
            message.contains(
                "Pipeline prod: spec.rollout is run by `kiln sync` (with or without --git"
            ),
            "{args:?}: {message}"
        );
    }
    assert!(
        !git(&["rev-parse", "--verify", "-q", "HEAD"])
            .status
            .success(),
        "nothing was committed"
    );
    // Rendering to stdout or a directory is what it was: no rollout there.
    assert!(kiln(&["render", "-f", d]).status.success());
}

#[test]
fn a_reader_that_stops_early_ends_the_render_quietly() {
    use std::io::Read as _;
    let dir = tempfile::tempdir().unwrap();
    let config = common::tenants(
        dir.path(),
        "pipe",
        3000,
        "  - id: cm\n    template: |\n      apiVersion: v1\n      kind: ConfigMap\n      metadata: {name: settings}\n      data: {tenant: \"{{ key }}\"}\n",
    );
    let mut child = common::kiln_command()
        .args(["render", "-f", config.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // `| head -c 100`: read a little, then close the pipe.
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 100];
    stdout.read_exact(&mut first).unwrap();
    drop(stdout);
    let out = child.wait_with_output().unwrap();
    let message = stderr(&out);
    assert!(!message.contains("panicked"), "{message}");
    assert_eq!(out.status.code(), Some(141), "{message}");
}
