//! The nodes' published profiles as decision facts, pooled per BTF build: nodes with the
//! same BTF digest share answers, and one of them (the representative) is asked the queries.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bpfpoly_crds::select::NodeFacts;
use bpfpoly_crds::BpfNodeProfile;
use kube::ResourceExt;

/// Facts per node, with answers shared by every node of the same BTF build.
pub struct FactsIndex {
    /// Node name to (decision-sharing key, facts). Nodes with the same key share one entry:
    /// their decisions are shared too (one facts value per kernel build, not one per node,
    /// which at 10,000 nodes was a third of the operator's peak memory).
    pub by_node: HashMap<String, Arc<(String, NodeFacts)>>,
    /// BTF digest to the node asked to answer queries for it.
    pub representative: HashMap<String, String>,
    /// Nodes whose profile status is not believed, and why (see [`crate::trust`]).
    pub untrusted: HashMap<String, String>,
}

impl FactsIndex {
    /// Indexes the published profiles.
    pub fn build(profiles: &[Arc<BpfNodeProfile>]) -> FactsIndex {
        let mut pooled: HashMap<String, BTreeMap<String, bool>> = HashMap::new();
        let mut representative: HashMap<String, String> = HashMap::new();
        let mut untrusted = HashMap::new();
        let profiles: Vec<&Arc<BpfNodeProfile>> = profiles
            .iter()
            .filter(|p| {
                let name = p.name_any();
                match crate::trust::untrusted_status(&name, &p.metadata) {
                    Some(why) => {
                        untrusted.insert(name, format!("profile {why}"));
                        false
                    }
                    None => true,
                }
            })
            .collect();
        for p in &profiles {
            let Some(s) = &p.status else { continue };
            if s.btf.sha256.is_empty() {
                continue;
            }
            pooled
                .entry(s.btf.sha256.clone())
                .or_default()
                .extend(s.answers.iter().map(|(k, v)| (k.clone(), *v)));
            let name = p.name_any();
            representative
                .entry(s.btf.sha256.clone())
                .and_modify(|r| {
                    if name < *r {
                        r.clone_from(&name);
                    }
                })
                .or_insert(name);
        }
        let mut shared: HashMap<String, Arc<(String, NodeFacts)>> = HashMap::new();
        let by_node = profiles
            .iter()
            .filter_map(|p| {
                let s = p.status.as_ref()?;
                // Decisions are shared by nodes whose facts are the same.
                let key = format!(
                    "{}|{}|{}|{:?}|{:?}|{:?}",
                    s.btf.sha256,
                    s.kernel.release,
                    s.btf.available,
                    s.program_types,
                    s.observed_program_types,
                    s.map_types
                );
                let facts = |key: &String| {
                    let mut facts = NodeFacts::from_status(s);
                    if let Some(pool) = pooled.get(&s.btf.sha256) {
                        facts.answers = pool.clone();
                    }
                    Arc::new((key.clone(), facts))
                };
                // Without a BTF digest a node's answers are its own: nothing to share.
                let entry = if s.btf.sha256.is_empty() {
                    facts(&key)
                } else {
                    shared.entry(key).or_insert_with_key(facts).clone()
                };
                Some((p.name_any(), entry))
            })
            .collect();
        FactsIndex {
            by_node,
            representative,
            untrusted,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(name: &str, sha: &str, release: &str, answer: bool) -> Arc<BpfNodeProfile> {
        let v = serde_json::json!({
            "apiVersion": "bpfpoly.io/v1alpha1", "kind": "BpfNodeProfile",
            "metadata": {"name": name},
            "spec": {},
            "status": {
                "kernel": {"release": release, "version": release.split('-').next().unwrap_or("")},
                "arch": "x86_64",
                "btf": {"available": true, "sha256": sha},
                "programTypes": ["xdp"], "mapTypes": ["ringbuf"],
                "answers": {"type:struct linux_binprm": answer},
                "agentVersion": "test"
            }
        });
        Arc::new(serde_json::from_value(v).expect("a valid profile"))
    }

    #[test]
    fn nodes_of_one_build_share_their_facts_and_answers() {
        let index = FactsIndex::build(&[
            profile("a", "d1", "6.1.0-50-cloud-amd64", true),
            profile("b", "d1", "6.1.0-50-cloud-amd64", false),
            profile("c", "d2", "6.12.1-cloud-amd64", false),
        ]);
        let (a, b, c) = (
            &index.by_node["a"],
            &index.by_node["b"],
            &index.by_node["c"],
        );
        assert!(Arc::ptr_eq(a, b), "a and b share a build: one entry");
        assert!(!Arc::ptr_eq(a, c));
        assert_ne!(a.0, c.0, "different builds, different decision keys");
        // Pooled: b's `false` and a's `true` for the same query; the pool holds one answer.
        assert_eq!(a.1.answers.len(), 1);
        assert_eq!(a.1.release, "6.1.0-50-cloud-amd64");
        assert_eq!(index.representative["d1"], "a");
    }

    #[test]
    fn nodes_without_a_digest_keep_their_own_answers() {
        let index = FactsIndex::build(&[
            profile("a", "", "6.1.0-50-cloud-amd64", true),
            profile("b", "", "6.1.0-50-cloud-amd64", false),
        ]);
        let (a, b) = (&index.by_node["a"], &index.by_node["b"]);
        assert!(!Arc::ptr_eq(a, b));
        assert_eq!(a.1.answers.get("type:struct linux_binprm"), Some(&true));
        assert_eq!(b.1.answers.get("type:struct linux_binprm"), Some(&false));
    }
}
