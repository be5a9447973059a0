//! The test cluster behaves as a real one does: Server-Side Apply with field
//! ownership and conflicts, ownerReference garbage collection, namespace
//! deletion. Everything in kiln-sync relies on these.

#![allow(clippy::unwrap_used)] // a test that cannot go on fails, with the cause

use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kiln_sync::client::{FIELD_MANAGER, connect};
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::core::ObjectMeta;
use serde_json::json;

async fn client() -> Client {
    let cluster = kiln_testenv::cluster();
    connect(Some(&cluster.kubeconfig), None)
        .await
        .expect("client for the test cluster")
}

async fn namespace(client: &Client, hint: &str) -> String {
    let name = kiln_testenv::unique_name(hint);
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    name
}

fn config_map(name: &str, value: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name},
        "data": {"greeting": value},
    })
}

/// Polls until `gone` returns true, for at most a minute.
async fn eventually(what: &str, mut gone: impl AsyncFnMut() -> bool) {
    for _ in 0..600 {
        if gone().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what} did not happen within a minute");
}

#[tokio::test]
async fn server_side_apply_records_kiln_as_field_manager() {
    let client = client().await;
    let ns = namespace(&client, "ssa").await;
    let api: Api<ConfigMap> = Api::namespaced(client, &ns);

    let applied = api
        .patch(
            "hello",
            &PatchParams::apply(FIELD_MANAGER),
            &Patch::Apply(config_map("hello", "hi")),
        )
        .await
        .unwrap();
    assert_eq!(applied.data.unwrap()["greeting"], "hi");

    let live = api.get("hello").await.unwrap();
    let fields = live.metadata.managed_fields.unwrap();
    let kiln = fields
        .iter()
        .find(|f| f.manager.as_deref() == Some(FIELD_MANAGER))
        .expect("an entry for the kiln field manager");
    assert_eq!(kiln.operation.as_deref(), Some("Apply"));
    let owned = &kiln.fields_v1.as_ref().unwrap().0;
    assert!(
        owned["f:data"].get("f:greeting").is_some(),
        "kiln owns data.greeting: {owned}"
    );
}

#[tokio::test]
async fn second_field_manager_conflicts_unless_it_forces() {
    let client = client().await;
    let ns = namespace(&client, "conflict").await;
    let api: Api<ConfigMap> = Api::namespaced(client, &ns);
    api.patch(
        "shared",
        &PatchParams::apply(FIELD_MANAGER),
        &Patch::Apply(config_map("shared", "kiln")),
    )
    .await
    .unwrap();

    let err = api
        .patch(
            "shared",
            &PatchParams::apply("intruder"),
            &Patch::Apply(config_map("shared", "other")),
        )
        .await
        .expect_err("a second manager changing an owned field must conflict");
    match err {
        kube::Error::Api(status) => {
            assert_eq!(status.code, 409, "{status:?}");
            assert!(
                status.message.contains(FIELD_MANAGER),
                "names the owner: {}",
                status.message
            );
            assert!(
                status.message.contains(".data.greeting"),
                "names the field: {}",
                status.message
            );
        }
        other => panic!("expected a 409 from the API server, got {other}"),
    }
    assert_eq!(
        api.get("shared").await.unwrap().data.unwrap()["greeting"],
        "kiln"
    );

    let forced = api
        .patch(
            "shared",
            &PatchParams::apply("intruder").force(),
            &Patch::Apply(config_map("shared", "other")),
        )
        .await
        .unwrap();
    assert_eq!(forced.data.unwrap()["greeting"], "other");
    let managers: Vec<_> = forced
        .metadata
        .managed_fields
        .unwrap()
        .into_iter()
        .filter(|f| {
            f.fields_v1
                .as_ref()
                .is_some_and(|v| v.0["f:data"].get("f:greeting").is_some())
        })
        .filter_map(|f| f.manager)
        .collect();
    assert_eq!(
        managers,
        ["intruder"],
        "forcing takes the field away from kiln"
    );
}

#[tokio::test]
async fn child_is_garbage_collected_after_its_owner_is_deleted() {
    let client = client().await;
    let ns = namespace(&client, "gc").await;
    let api: Api<ConfigMap> = Api::namespaced(client, &ns);
    let owner = api
        .create(
            &PostParams::default(),
            &serde_json::from_value(config_map("owner", "o")).unwrap(),
        )
        .await
        .unwrap();
    let mut child = config_map("child", "c");
    child["metadata"]["ownerReferences"] = json!([{
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "name": "owner",
        "uid": owner.metadata.uid.unwrap(),
    }]);
    api.create(
        &PostParams::default(),
        &serde_json::from_value(child).unwrap(),
    )
    .await
    .unwrap();

    api.delete("owner", &DeleteParams::default()).await.unwrap();
    eventually("garbage collection of the child", async || {
        api.get_opt("child").await.unwrap().is_none()
    })
    .await;
}

#[tokio::test]
async fn deleted_namespace_disappears_with_its_contents() {
    let client = client().await;
    let ns = namespace(&client, "doomed").await;
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    config_maps
        .create(
            &PostParams::default(),
            &serde_json::from_value(config_map("content", "x")).unwrap(),
        )
        .await
        .unwrap();

    let namespaces: Api<Namespace> = Api::all(client);
    namespaces
        .delete(&ns, &DeleteParams::default())
        .await
        .unwrap();
    eventually("namespace deletion", async || {
        namespaces.get_opt(&ns).await.unwrap().is_none()
    })
    .await;
    // The namespace is gone only once the namespace controller emptied it.
    assert!(config_maps.get_opt("content").await.unwrap().is_none());
}
