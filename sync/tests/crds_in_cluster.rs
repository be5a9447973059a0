//! The generated CRDs are accepted by a real API server, and their schema and
//! CEL rules turn bad objects away before the controller ever sees them.

#![allow(clippy::unwrap_used)] // a test that cannot go on fails, with the cause

use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kiln_render::api::{Blueprint, Source};
use kiln_sync::client::{FIELD_MANAGER, connect};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;

async fn install_crds(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in kiln_render::api::crds() {
        let name = crd.name_any();
        crds.patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&crd),
        )
        .await
        .unwrap();
        for _ in 0..300 {
            let live = crds.get(&name).await.unwrap();
            let established = live
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            if established {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn rejection<K>(api: &Api<K>, object: serde_json::Value) -> String
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let object: K = serde_json::from_value(object).unwrap();
    match api.create(&PostParams::default(), &object).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422, "{status:?}");
            status.message
        }
        other => panic!("expected the API server to reject the object, got {other:?}"),
    }
}

#[tokio::test]
async fn crds_install_and_their_rules_reject_bad_objects() {
    let cluster = kiln_testenv::cluster();
    let client = connect(Some(&cluster.kubeconfig), None).await.unwrap();
    install_crds(&client).await;
    let ns = kiln_testenv::unique_name("crds");
    let namespace: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .unwrap();

    let sources: Api<Source> = Api::namespaced(client.clone(), &ns);
    let good = json!({
        "apiVersion": "kiln.dev/v1alpha1", "kind": "Source", "metadata": {"name": "tenants"},
        "spec": {"urlFrom": {"secretKeyRef": {"name": "db", "key": "url"}}, "query": "SELECT 1", "key": "id"},
    });
    sources
        .create(
            &PostParams::default(),
            &serde_json::from_value(good).unwrap(),
        )
        .await
        .unwrap();
    let both = json!({
        "apiVersion": "kiln.dev/v1alpha1", "kind": "Source", "metadata": {"name": "both"},
        "spec": {"url": "sqlite://x.db", "urlFrom": {"env": "X"}, "key": "id"},
    });
    let message = rejection(&sources, both).await;
    assert!(
        message.contains("exactly one of url, urlFrom and kubernetes must be set"),
        "{message}"
    );

    let blueprints: Api<Blueprint> = Api::namespaced(client, &ns);
    let resource = |id: &str| json!({"id": id, "template": "x"});
    let duplicate = json!({
        "apiVersion": "kiln.dev/v1alpha1", "kind": "Blueprint", "metadata": {"name": "dup"},
        "spec": {"source": "tenants", "resources": [resource("app"), resource("app")]},
    });
    let message = rejection(&blueprints, duplicate).await;
    assert!(message.contains("Duplicate value"), "{message}");

    let bad_id = json!({
        "apiVersion": "kiln.dev/v1alpha1", "kind": "Blueprint", "metadata": {"name": "bad-id"},
        "spec": {"source": "tenants", "resources": [resource("App_1")]},
    });
    let message = rejection(&blueprints, bad_id).await;
    assert!(message.contains("id must be a DNS label"), "{message}");

    let bad_policy = json!({
        "apiVersion": "kiln.dev/v1alpha1", "kind": "Blueprint", "metadata": {"name": "bad-policy"},
        "spec": {"source": "tenants", "resources": [{"id": "app", "template": "x", "deletionPolicy": "Sometimes"}]},
    });
    // The typed client cannot even build this object; send it untyped.
    let dynamic: Api<kube::api::DynamicObject> = Api::namespaced_with(
        blueprints.clone().into_client(),
        &ns,
        &kube::api::ApiResource::erase::<Blueprint>(&()),
    );
    let message = rejection(&dynamic, bad_policy).await;
    assert!(
        message.contains("deletionPolicy") && message.contains("Unsupported value"),
        "{message}"
    );

    // Each rule, one bad object at a time, with the message a person reads.
    let blueprint = |name: &str, resources: serde_json::Value| {
        json!({
            "apiVersion": "kiln.dev/v1alpha1", "kind": "Blueprint", "metadata": {"name": name},
            "spec": {"source": "tenants", "resources": resources},
        })
    };
    let refused = [
        (
            blueprint(
                "two-templates",
                json!([{"id": "a", "template": "x", "templateFile": "t.j2"}]),
            ),
            "exactly one of template, templateFile and templateFrom must be set",
        ),
        (
            blueprint(
                "repeated-dependency",
                json!([resource("a"), {"id": "b", "template": "x", "dependsOn": ["a", "a"]}]),
            ),
            "Duplicate value",
        ),
        (
            blueprint(
                "own-dependency",
                json!([{"id": "a", "template": "x", "dependsOn": ["a"]}]),
            ),
            "a resource cannot depend on itself",
        ),
        (
            blueprint(
                "bad-timeout",
                json!([{"id": "a", "template": "x", "timeout": "5 minutes"}]),
            ),
            "timeout must be a positive duration",
        ),
        (
            blueprint(
                "bad-pointer",
                json!([{"id": "a", "template": "x", "ignoreFields": ["spec.replicas"]}]),
            ),
            "ignoreFields are JSON pointers",
        ),
        (
            blueprint("empty", json!([])),
            "a blueprint needs at least one resource",
        ),
        (
            json!({
                "apiVersion": "kiln.dev/v1alpha1", "kind": "Source", "metadata": {"name": "fast"},
                "spec": {"url": "sqlite://x.db", "query": "SELECT 1", "key": "id", "interval": "100ms"},
            }),
            "interval must be a duration of at least 1s",
        ),
        (
            json!({
                "apiVersion": "kiln.dev/v1alpha1", "kind": "Source", "metadata": {"name": "slow"},
                "spec": {"url": "sqlite://x.db", "query": "SELECT 1", "key": "id", "timeout": "forever"},
            }),
            "timeout must be a positive duration",
        ),
        (
            json!({
                "apiVersion": "kiln.dev/v1alpha1", "kind": "Source", "metadata": {"name": "told"},
                "spec": {"url": "postgres://db/x", "query": "SELECT 1", "key": "id", "notify": {"channel": "tenants; DROP"}},
            }),
            "notify.channel must be a PostgreSQL identifier",
        ),
        (
            json!({
                "apiVersion": "kiln.dev/v1alpha1", "kind": "Pipeline", "metadata": {"name": "guard"},
                "spec": {"deletionGuard": {"maxPercent": 150}},
            }),
            "maxPercent must be between 0 and 100",
        ),
        (
            json!({
                "apiVersion": "kiln.dev/v1alpha1", "kind": "Pipeline", "metadata": {"name": "account"},
                "spec": {"serviceAccountName": "Deployer_1"},
            }),
            "serviceAccountName must be the name of a ServiceAccount",
        ),
        (
            rollout(
                "both",
                json!([{"name": "early", "select": "true", "percent": 10}, {"name": "rest"}]),
            ),
            "a wave takes its instances by at most one of instances, select and percent",
        ),
        (
            rollout(
                "two-kinds",
                json!([{"name": "rest", "gates": [{"approval": {}, "window": {"from": "09:00", "to": "16:00"}}]}]),
            ),
            "a gate is exactly one of approval, window, condition, release, allOf and anyOf",
        ),
        (
            rollout(
                "nested",
                json!([{"name": "rest", "gates": [{"anyOf": [{"allOf": [{"approval": {}}]}]}]}]),
            ),
            "allOf",
        ),
        (
            rollout("quorum", json!([{"name": "rest", "quorum": "101%"}])),
            "quorum must be a count (3) or a percentage (95%)",
        ),
        (
            rollout("negative", json!([{"name": "rest", "quorum": -1}])),
            "quorum must be a count (3) or a percentage (95%)",
        ),
        (
            rollout("name", json!([{"name": "Rest"}])),
            "a wave's name must be a DNS label",
        ),
    ];
    let client = dynamic.into_client();
    for (object, expected) in refused {
        let kind = object["kind"].as_str().unwrap();
        let resource = match kind {
            "Source" => kube::api::ApiResource::erase::<Source>(&()),
            "Blueprint" => kube::api::ApiResource::erase::<Blueprint>(&()),
            _ => kube::api::ApiResource::erase::<kiln_render::api::Pipeline>(&()),
        };
        let api: Api<kube::api::DynamicObject> =
            Api::namespaced_with(client.clone(), &ns, &resource);
        let message = rejection(&api, object.clone()).await;
        assert!(message.contains(expected), "{object}: {message}");
    }
    // Durations as Kubernetes writes them pass.
    let sources: Api<Source> = Api::namespaced(client.clone(), &ns);
    let good = json!({
        "apiVersion": "kiln.dev/v1alpha1", "kind": "Source", "metadata": {"name": "hourly"},
        "spec": {"url": "sqlite://x.db", "query": "SELECT 1", "key": "id", "interval": "1h30m", "timeout": "2.5s"},
    });
    sources
        .create(
            &PostParams::default(),
            &serde_json::from_value(good).unwrap(),
        )
        .await
        .unwrap();
    // The strategy of the documentation passes.
    let pipelines: Api<kiln_render::api::Pipeline> = Api::namespaced(client, &ns);
    let good = rollout(
        "staged",
        json!([
            {"name": "canary", "instances": ["acme", "globex"], "quorum": 1},
            {"name": "early", "select": "row.tier == 'internal'", "maxConcurrent": 5},
            {"name": "ten-percent", "percent": 10, "quorum": "100%", "gates": [{"approval": {}}]},
            {"name": "rest", "maxConcurrent": 50, "quorum": "95%", "gates": [
                {"window": {"days": "Mon-Fri", "from": "09:00", "to": "16:00", "timeZone": "UTC"}},
                {"anyOf": [{"approval": {}}, {"condition": {"apiVersion": "v1", "kind": "ConfigMap", "name": "go", "expression": "object.data.go == 'yes'"}}]},
            ]},
        ]),
    );
    pipelines
        .create(
            &PostParams::default(),
            &serde_json::from_value(good).unwrap(),
        )
        .await
        .unwrap();
}

fn rollout(name: &str, waves: serde_json::Value) -> serde_json::Value {
    json!({
        "apiVersion": "kiln.dev/v1alpha1", "kind": "Pipeline", "metadata": {"name": name},
        "spec": {"rollout": {"waves": waves, "progressDeadline": "10m", "onFailure": "Rollback"}},
    })
}
