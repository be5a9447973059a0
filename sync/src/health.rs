//! Readiness of a live object, judged from its status as kstatus does:
//! built-in rules for workloads and a few other kinds, the `Ready` condition
//! for custom resources, ready at once for everything else.

use serde_json::Value;

/// How healthy an object is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Dependents may go ahead.
    Ready,
    /// Not yet; why.
    Progressing(String),
    /// It will not become ready by waiting (a failed Job).
    Failed(String),
}

/// Judges `object` (as read from the API server).
pub fn health(object: &Value) -> Health {
    let kind = object["kind"].as_str().unwrap_or_default();
    let group = object["apiVersion"]
        .as_str()
        .and_then(|v| v.rsplit_once('/'))
        .map_or("", |(g, _)| g);
    let status = &object["status"];
    let generation = object["metadata"]["generation"].as_i64().unwrap_or(0);
    let observed = status["observedGeneration"].as_i64();
    let stale = || observed.is_some_and(|o| o < generation);
    let int = |field: &str| status[field].as_i64().unwrap_or(0);
    let replicas = object["spec"]["replicas"].as_i64().unwrap_or(1);
    match (group, kind) {
        ("apps", "Deployment") => {
            if stale() {
                return progressing("the controller has not observed the latest generation");
            }
            if let Some(reason) = condition(status, "Progressing")
                .filter(|c| c["status"] == "False")
                .and_then(|c| c["reason"].as_str())
            {
                return Health::Failed(format!("Progressing is False: {reason}"));
            }
            let updated = status["updatedReplicas"]
                .as_i64()
                .unwrap_or(int("availableReplicas"));
            if updated < replicas {
                return progressing(&format!("{updated} of {replicas} replicas updated"));
            }
            if int("availableReplicas") < replicas {
                return progressing(&format!(
                    "{} of {replicas} replicas available",
                    int("availableReplicas")
                ));
            }
            Health::Ready
        }
        ("apps", "StatefulSet") => {
            if stale() {
                return progressing("the controller has not observed the latest generation");
            }
            if int("readyReplicas") < replicas {
                return progressing(&format!(
                    "{} of {replicas} replicas ready",
                    int("readyReplicas")
                ));
            }
            match status["updatedReplicas"].as_i64() {
                Some(updated) if updated < replicas => {
                    progressing(&format!("{updated} of {replicas} replicas updated"))
                }
                _ => Health::Ready,
            }
        }
        ("apps", "DaemonSet") => {
            if observed.is_none() || stale() {
                return progressing("the controller has not observed the latest generation");
            }
            let desired = int("desiredNumberScheduled");
            if int("numberReady") < desired {
                return progressing(&format!("{} of {desired} pods ready", int("numberReady")));
            }
            match status["updatedNumberScheduled"].as_i64() {
                Some(updated) if updated < desired => {
                    progressing(&format!("{updated} of {desired} pods updated"))
                }
                _ => Health::Ready,
            }
        }
        ("batch", "Job") => {
            if is_true(status, "Complete") {
                Health::Ready
            } else if is_true(status, "Failed") {
                let message = condition(status, "Failed")
                    .and_then(|c| c["message"].as_str().or(c["reason"].as_str()))
                    .unwrap_or("the job failed");
                Health::Failed(message.to_string())
            } else {
                progressing("the job has not completed")
            }
        }
        ("", "PersistentVolumeClaim") => phase(status, "Bound"),
        ("", "Namespace") => phase(status, "Active"),
        ("apiextensions.k8s.io", "CustomResourceDefinition") => {
            if is_true(status, "Established") {
                Health::Ready
            } else if condition(status, "NamesAccepted").is_some_and(|c| c["status"] == "False") {
                Health::Failed(format!(
                    "names not accepted: {}",
                    condition(status, "NamesAccepted")
                        .and_then(|c| c["message"].as_str())
                        .unwrap_or_default()
                ))
            } else {
                progressing("not established yet")
            }
        }
        ("", "Service") if object["spec"]["type"] == "LoadBalancer" => {
            if status["loadBalancer"]["ingress"]
                .as_array()
                .is_some_and(|i| !i.is_empty())
            {
                Health::Ready
            } else {
                progressing("no load balancer ingress yet")
            }
        }
        (group, _) if is_custom(group) => {
            if stale() {
                return progressing("the controller has not observed the latest generation");
            }
            match condition(status, "Ready") {
                Some(c) if c["status"] == "True" => Health::Ready,
                Some(c) => progressing(&format!(
                    "Ready is {}{}",
                    c["status"].as_str().unwrap_or("Unknown"),
                    c["message"]
                        .as_str()
                        .map(|m| format!(": {m}"))
                        .unwrap_or_default()
                )),
                None => progressing("no Ready condition yet"),
            }
        }
        _ => Health::Ready,
    }
}

/// Custom resources live in groups with a dot that are not Kubernetes' own.
fn is_custom(group: &str) -> bool {
    group.contains('.') && !group.ends_with(".k8s.io") && group != "kiln.dev"
}

fn progressing(why: &str) -> Health {
    Health::Progressing(why.to_string())
}

fn condition<'v>(status: &'v Value, kind: &str) -> Option<&'v Value> {
    status["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
}

fn is_true(status: &Value, kind: &str) -> bool {
    condition(status, kind).is_some_and(|c| c["status"] == "True")
}

fn phase(status: &Value, wanted: &str) -> Health {
    match status["phase"].as_str() {
        Some(p) if p == wanted => Health::Ready,
        Some(p) => progressing(&format!("phase {p}")),
        None => progressing("no phase yet"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn deployment(status: Value) -> Value {
        json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"generation": 2}, "spec": {"replicas": 2}, "status": status})
    }

    #[test]
    fn a_deployment_is_ready_when_its_replicas_are_available() {
        assert!(matches!(
            health(&deployment(json!({}))),
            Health::Progressing(_)
        ));
        assert!(matches!(
            health(&deployment(
                json!({"observedGeneration": 1, "availableReplicas": 2})
            )),
            Health::Progressing(_)
        ));
        assert_eq!(
            health(&deployment(
                json!({"observedGeneration": 2, "updatedReplicas": 2, "availableReplicas": 2})
            )),
            Health::Ready
        );
        assert_eq!(
            health(&deployment(json!({"availableReplicas": 2}))),
            Health::Ready
        );
    }

    #[test]
    fn a_custom_resource_needs_a_true_ready_condition() {
        let cr = |conditions: Value| json!({"apiVersion": "example.com/v1", "kind": "Db", "metadata": {}, "status": {"conditions": conditions}});
        assert!(matches!(health(&cr(json!([]))), Health::Progressing(_)));
        assert!(matches!(
            health(&cr(json!([{"type": "Ready", "status": "False"}]))),
            Health::Progressing(_)
        ));
        assert_eq!(
            health(&cr(json!([{"type": "Ready", "status": "True"}]))),
            Health::Ready
        );
    }

    #[test]
    fn jobs_fail_and_config_maps_are_always_ready() {
        let job = json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {},
            "status": {"conditions": [{"type": "Failed", "status": "True", "message": "BackoffLimitExceeded"}]}});
        assert_eq!(health(&job), Health::Failed("BackoffLimitExceeded".into()));
        assert_eq!(
            health(&json!({"apiVersion": "v1", "kind": "ConfigMap"})),
            Health::Ready
        );
        let lb = json!({"apiVersion": "v1", "kind": "Service", "spec": {"type": "LoadBalancer"}});
        assert!(matches!(health(&lb), Health::Progressing(_)));
        let crd = json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "status": {"conditions": [{"type": "Established", "status": "True"}]}});
        assert_eq!(health(&crd), Health::Ready);
    }
}
