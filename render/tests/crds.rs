//! The committed CRDs are the ones the Rust types generate.

#[test]
fn committed_crds_match_the_api_types() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../crds/kiln.dev.yaml");
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    let generated = kiln_render::api::crds_yaml().expect("CRDs serialise");
    assert!(
        committed == generated,
        "crds/kiln.dev.yaml is out of date with render/src/api.rs; regenerate it with:\n    cargo run -- crds > crds/kiln.dev.yaml"
    );
}
