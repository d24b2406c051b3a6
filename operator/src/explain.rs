//! `bpfpoly-operator explain`: what was chosen where, and why, read from the cluster.

use std::fmt::Write as _;

use bpfpoly_crds::select::{decide, NodeFacts};
use bpfpoly_crds::state::ProgramStatus;
use bpfpoly_crds::{BpfNodeProfile, BpfNodeState, BpfPolyProgram};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};

use crate::facts::FactsIndex;

/// Renders the explanation of one program on every selected node (or one node).
pub async fn explain(
    client: &Client,
    program: &str,
    only_node: Option<&str>,
) -> Result<String, kube::Error> {
    let p = Api::<BpfPolyProgram>::all(client.clone())
        .get(program)
        .await?;
    let lp = ListParams::default();
    let nodes = Api::<Node>::all(client.clone()).list(&lp).await?;
    let profiles: Vec<std::sync::Arc<BpfNodeProfile>> = Api::<BpfNodeProfile>::all(client.clone())
        .list(&lp)
        .await?
        .items
        .into_iter()
        .map(std::sync::Arc::new)
        .collect();
    let states = Api::<BpfNodeState>::all(client.clone()).list(&lp).await?;
    let index = FactsIndex::build(&profiles);
    let mut out = String::new();
    write_header(&mut out, program, &p);
    let mut names: Vec<String> = nodes
        .items
        .iter()
        .filter(|n| crate::selector::matches(p.spec.node_selector.as_ref(), n.labels()))
        .map(|n| n.name_any())
        .filter(|n| only_node.is_none_or(|o| o == n))
        .collect();
    names.sort();
    let none = NodeFacts::default();
    for node in names {
        let facts = index.by_node.get(&node).map(|e| &e.1).unwrap_or(&none);
        let kernel = if facts.release.is_empty() {
            "no profile yet".to_string()
        } else {
            facts.release.clone()
        };
        let _ = writeln!(out, "\nnode {node} (kernel {kernel}):");
        for line in decide(&p.spec, facts).explain().lines() {
            let _ = writeln!(out, "  operator: {line}");
        }
        let reported = states
            .items
            .iter()
            .find(|s| s.name_any() == node)
            .and_then(|s| s.status.as_ref())
            .and_then(|s| s.programs.iter().find(|ps| ps.name == program));
        match reported {
            None => {
                let _ = writeln!(out, "  agent: nothing reported yet");
            }
            Some(r) => write_agent_report(&mut out, r),
        }
    }
    Ok(out)
}

/// The program's generation, its conditions and its rollout line.
fn write_header(out: &mut String, program: &str, p: &BpfPolyProgram) {
    let _ = writeln!(
        out,
        "BpfPolyProgram {program} (generation {})",
        p.metadata.generation.unwrap_or(0)
    );
    if let Some(s) = &p.status {
        for c in &s.conditions {
            let _ = writeln!(
                out,
                "  {}={} {}: {}",
                c.type_, c.status, c.reason, c.message
            );
        }
        let _ = writeln!(out, "  rollout: {}", s.rollout.message);
    }
}

/// What one node's agent reported: phase, variant, fallbacks with their verifier tails, and
/// the dispatch slots.
fn write_agent_report(out: &mut String, r: &ProgramStatus) {
    let _ = writeln!(
        out,
        "  agent: {:?} variant={} mechanism={} generation={} ids={:?} {}",
        r.phase,
        r.variant.as_deref().unwrap_or("-"),
        r.mechanism.as_deref().unwrap_or("-"),
        r.observed_generation,
        r.program_ids,
        r.message
    );
    for f in &r.fallbacks {
        let _ = writeln!(
            out,
            "  agent: fell back {} -> {} at {}: {}",
            f.from, f.to, f.stage, f.reason
        );
        if let Some(log) = &f.verifier_log {
            let tail: Vec<&str> = log.lines().rev().take(3).collect();
            for l in tail.into_iter().rev() {
                let _ = writeln!(out, "    verifier: {l}");
            }
        }
    }
    for h in &r.handlers {
        let _ = writeln!(
            out,
            "  agent: slot {} -> {}: {}{}",
            h.key,
            h.handler,
            h.state,
            h.reason
                .as_deref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default()
        );
    }
}
