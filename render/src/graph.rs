//! The dependency graph of a blueprint's resources: `dependsOn` edges, checked
//! for missing ids and cycles, giving a deterministic topological order and
//! each resource's depth (its sync wave).

use std::collections::BTreeMap;

use petgraph::algo::tarjan_scc;
use petgraph::graph::{DiGraph, NodeIndex};

use crate::api::ResourceSpec;

/// Order and depth of a blueprint's resources, by index into its list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Graph {
    /// Resource indices in dependency order: by depth, then by id.
    pub order: Vec<usize>,
    /// Each resource's depth: 0 without dependencies, else one more than the
    /// deepest resource it depends on.
    pub depth: Vec<usize>,
}

/// Builds the graph; every problem found is returned, not only the first.
pub fn build(resources: &[ResourceSpec]) -> Result<Graph, Vec<String>> {
    let mut graph = DiGraph::<usize, ()>::new();
    let nodes: Vec<NodeIndex> = (0..resources.len()).map(|i| graph.add_node(i)).collect();
    let by_id: BTreeMap<&str, usize> = resources
        .iter()
        .enumerate()
        .map(|(i, r)| (r.id.as_str(), i))
        .collect();
    let mut errors = Vec::new();
    for (i, resource) in resources.iter().enumerate() {
        for dependency in &resource.depends_on {
            match by_id.get(dependency.as_str()) {
                Some(&d) => {
                    graph.update_edge(nodes[d], nodes[i], ());
                }
                None => errors.push(format!("resource {} depends on {dependency}, which is not a resource of this blueprint", resource.id)),
            }
        }
    }
    for component in tarjan_scc(&graph) {
        let cyclic = component.len() > 1 || graph.contains_edge(component[0], component[0]);
        if cyclic {
            let mut ids: Vec<&str> = component
                .iter()
                .map(|n| resources[graph[*n]].id.as_str())
                .collect();
            ids.sort_unstable();
            errors.push(format!(
                "dependency cycle between resources {}",
                ids.join(", ")
            ));
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }

    // Kahn's algorithm gives each resource its depth (longest path from a
    // resource without dependencies); ordering by (depth, id) is then
    // topological, groups resources by sync wave and breaks ties by id.
    let mut waiting: Vec<usize> = nodes
        .iter()
        .map(|n| graph.neighbors_directed(*n, petgraph::Incoming).count())
        .collect();
    let mut ready: Vec<usize> = (0..resources.len()).filter(|i| waiting[*i] == 0).collect();
    let mut depth = vec![0; resources.len()];
    while let Some(i) = ready.pop() {
        for next in graph.neighbors_directed(nodes[i], petgraph::Outgoing) {
            let j = graph[next];
            depth[j] = depth[j].max(depth[i] + 1);
            waiting[j] -= 1;
            if waiting[j] == 0 {
                ready.push(j);
            }
        }
    }
    let mut order: Vec<usize> = (0..resources.len()).collect();
    order.sort_by_key(|i| (depth[*i], resources[*i].id.as_str()));
    Ok(Graph { order, depth })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resource(id: &str, depends_on: &[&str]) -> ResourceSpec {
        serde_json::from_value(serde_json::json!({
            "id": id, "template": "x", "dependsOn": depends_on,
        }))
        .unwrap()
    }

    #[test]
    fn order_is_topological_with_ties_broken_by_id() {
        let resources = [
            resource("service", &["app"]),
            resource("app", &["namespace", "config"]),
            resource("config", &["namespace"]),
            resource("namespace", &[]),
            resource("quota", &["namespace"]),
        ];
        let graph = build(&resources).unwrap();
        let ids: Vec<&str> = graph
            .order
            .iter()
            .map(|i| resources[*i].id.as_str())
            .collect();
        assert_eq!(ids, ["namespace", "config", "quota", "app", "service"]);
        assert_eq!(graph.depth, [3, 2, 1, 0, 1]);
    }

    #[test]
    fn cycles_name_every_id_on_them() {
        let resources = [
            resource("a", &["c"]),
            resource("b", &["a"]),
            resource("c", &["b"]),
            resource("d", &["d"]),
        ];
        let errors = build(&resources).unwrap_err();
        assert!(
            errors.contains(&"dependency cycle between resources a, b, c".to_string()),
            "{errors:?}"
        );
        assert!(
            errors.contains(&"dependency cycle between resources d".to_string()),
            "{errors:?}"
        );
    }

    #[test]
    fn missing_dependencies_are_named() {
        let errors = build(&[resource("app", &["db"])]).unwrap_err();
        assert_eq!(
            errors,
            ["resource app depends on db, which is not a resource of this blueprint"]
        );
    }
}
