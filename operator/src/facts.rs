//! The nodes' published profiles as decision facts, pooled per BTF build: nodes with the
//! same BTF digest share answers, and one of them (the representative) is asked the queries.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bpfpoly_crds::select::NodeFacts;
use bpfpoly_crds::BpfNodeProfile;
use kube::ResourceExt;

/// Facts per node, with answers shared by every node of the same BTF build.
pub struct FactsIndex {
    /// Node name to (decision-sharing key, facts).
    pub by_node: HashMap<String, (String, NodeFacts)>,
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
        let by_node = profiles
            .iter()
            .filter_map(|p| {
                let s = p.status.as_ref()?;
                let mut facts = NodeFacts::from_status(s);
                if let Some(pool) = pooled.get(&s.btf.sha256) {
                    facts.answers = pool.clone();
                }
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
                Some((p.name_any(), (key, facts)))
            })
            .collect();
        FactsIndex {
            by_node,
            representative,
            untrusted,
        }
    }
}
