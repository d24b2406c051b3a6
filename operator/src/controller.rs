//! The `BpfPolyProgram` controller: per-node decisions, rollout waves, status, Events and the
//! unload finalizer. Node states and profiles are written by [`crate::writer`], one patch per
//! node, from the targets this controller publishes.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bpfpoly_crds::program::OnNoEligibleVariant;
use bpfpoly_crds::select::{decide, program_queries, Decision, NodeFacts, Outcome};
use bpfpoly_crds::state::{Phase, ProgramAssignment, ProgramStatus};
use bpfpoly_crds::validate::{spec_warnings, validate_program};
use bpfpoly_crds::{BpfNodeState, BpfPolyProgram};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{finalizer, Event as Finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::ResourceExt;

use crate::aggregate::{aggregate, Inputs, NodeOutcome};
pub use crate::context::{Context, ProgramTargets};
use crate::facts::FactsIndex;
use crate::liveness::{older_boot, Agent};
use crate::rollout::{plan, NodeProgress};
use crate::status::{announce, no_nodes_message, set_condition, write_status};
use crate::Error;

/// Finalizer that makes deletion wait for the agents to unload.
pub const FINALIZER: &str = "bpfpoly.io/unload";

/// Reconciles one program.
pub async fn reconcile(obj: Arc<BpfPolyProgram>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let api: Api<BpfPolyProgram> = Api::all(ctx.client.clone());
    let obj = ensure_finalizer(&api, obj).await?;
    let result = finalizer(&api, FINALIZER, obj, |event| async {
        match event {
            Finalizer::Apply(p) => apply(p, &ctx).await,
            Finalizer::Cleanup(p) => cleanup(p, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    ctx.metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    result
}

/// Adds the finalizer with a merge patch guarded by the resourceVersion. (kube's helper uses
/// a JSON patch `test` of a missing path, which Kubernetes 1.20 rejects with 422.)
async fn ensure_finalizer(
    api: &Api<BpfPolyProgram>,
    obj: Arc<BpfPolyProgram>,
) -> Result<Arc<BpfPolyProgram>, Error> {
    if obj.metadata.deletion_timestamp.is_some() || obj.finalizers().iter().any(|f| f == FINALIZER)
    {
        return Ok(obj);
    }
    let mut finalizers = obj.finalizers().to_vec();
    finalizers.push(FINALIZER.to_string());
    let patch = serde_json::json!({"metadata": {
        "finalizers": finalizers,
        "resourceVersion": obj.resource_version(),
    }});
    let updated = api
        .patch(
            &obj.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .map_err(Error::Kube)?;
    Ok(Arc::new(updated))
}

/// Requeue on error, with the error counted by kind.
pub fn error_policy(obj: Arc<BpfPolyProgram>, err: &Error, ctx: Arc<Context>) -> Action {
    if let Error::Finalizer(inner) = err {
        if let kube::runtime::finalizer::Error::CleanupFailed(Error::UnloadPending(nodes)) =
            inner.as_ref()
        {
            tracing::info!(program = %obj.name_any(), %nodes, "waiting for agents to unload");
            return Action::requeue(Duration::from_secs(1));
        }
    }
    if let Error::Finalizer(inner) = err {
        if let kube::runtime::finalizer::Error::RemoveFinalizer(kube::Error::Api(s)) =
            inner.as_ref()
        {
            if s.code == 404 {
                // Deleted between the unload and the finalizer's removal: done, not a failure.
                tracing::debug!(program = %obj.name_any(), "gone before its finalizer was removed");
                return Action::await_change();
            }
        }
    }
    tracing::warn!(program = %obj.name_any(), error = %err, "reconcile failed");
    ctx.metrics
        .reconcile_errors
        .with_label_values(&[err.metric_label()])
        .inc();
    let unwrapped = match err {
        Error::Finalizer(inner) => match inner.as_ref() {
            kube::runtime::finalizer::Error::ApplyFailed(e)
            | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
            _ => err,
        },
        e => e,
    };
    if matches!(unwrapped, Error::StatusRefused(_)) {
        return Action::requeue(Duration::from_secs(60));
    }
    Action::requeue(Duration::from_secs(5))
}

/// What `node` reported for program `name`, if anything and if it is believed; otherwise why
/// it is not (see [`crate::trust`]).
fn believed<'a>(
    node: &str,
    state: Option<&'a BpfNodeState>,
    name: &str,
) -> Result<Option<&'a ProgramStatus>, String> {
    let Some(state) = state else { return Ok(None) };
    if let Some(why) = crate::trust::untrusted_status(node, &state.metadata) {
        return Err(why);
    }
    let Some(reported) = state
        .status
        .as_ref()
        .and_then(|st| st.programs.iter().find(|ps| ps.name == name))
    else {
        return Ok(None);
    };
    let assigned = state
        .spec
        .programs
        .iter()
        .find(|a| a.name == name)
        .map(|a| &**a);
    match crate::trust::inconsistent_entry(assigned, reported) {
        Some(why) => Err(why),
        None => Ok(Some(reported)),
    }
}

async fn apply(p: Arc<BpfPolyProgram>, ctx: &Context) -> Result<Action, Error> {
    let name = p.name_any();
    let generation = p.metadata.generation.unwrap_or(0);
    let problems = validate_program(&p);
    if !problems.is_empty() {
        // Keep whatever runs: an invalid spec never removes a working version.
        let message = problems
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        announce(
            ctx,
            &p,
            &format!("invalid/{generation}"),
            EventType::Warning,
            "Invalid",
            &message,
        )
        .await;
        let mut status = p.status.clone().unwrap_or_default();
        status.observed_generation = Some(generation);
        set_condition(
            &mut status.conditions,
            generation,
            "Ready",
            false,
            "Invalid",
            &message,
        );
        write_status(ctx, &p, status).await?;
        return Ok(Action::await_change());
    }
    let warnings: Vec<String> = spec_warnings(&p.spec)
        .iter()
        .map(ToString::to_string)
        .collect();
    if !warnings.is_empty() {
        announce(
            ctx,
            &p,
            &format!("warnings/{generation}"),
            EventType::Warning,
            "SpecWarning",
            &warnings.join("; "),
        )
        .await;
    }

    let facts = FactsIndex::build(&ctx.profiles.state());
    ctx.metrics
        .ignored_node_status
        .with_label_values(&["profile"])
        .set(facts.untrusted.len() as i64);
    let queries: Vec<String> = program_queries(&p.spec)
        .iter()
        .map(ToString::to_string)
        .collect();
    let mut decisions: HashMap<&str, Decision> = HashMap::new();
    let mut selected: Vec<String> = ctx
        .nodes
        .state()
        .iter()
        .filter(|n| crate::selector::matches(p.spec.node_selector.as_ref(), n.labels()))
        .map(|n| n.name_any())
        .collect();
    selected.sort();
    if selected.is_empty() {
        announce(
            ctx,
            &p,
            &format!("no-nodes/{generation}"),
            EventType::Warning,
            "NoNodesSelected",
            &no_nodes_message(&p),
        )
        .await;
    }

    let states: HashMap<String, Arc<BpfNodeState>> = ctx
        .states
        .state()
        .into_iter()
        .map(|s| (s.name_any(), s))
        .collect();
    ctx.metrics
        .ignored_node_status
        .with_label_values(&["state"])
        .set(
            states
                .iter()
                .filter(|(n, s)| crate::trust::untrusted_status(n, &s.metadata).is_some())
                .count() as i64,
        );
    let pending_facts = NodeFacts::default();
    let mut outcomes: BTreeMap<String, NodeOutcome<'_>> = BTreeMap::new();
    let mut eligible = Vec::new();
    let mut query_nodes = HashSet::new();
    let mut candidates_by_node: HashMap<String, Arc<ProgramAssignment>> = HashMap::new();
    let mut assignment_by_key: HashMap<&str, Arc<ProgramAssignment>> = HashMap::new();
    // Nodes whose report does not count: a lost agent, or a report from an older boot.
    let mut discounted: HashSet<String> = HashSet::new();
    for node in &selected {
        let (key, node_facts) = facts
            .by_node
            .get(node)
            .map(|(k, f)| (k.as_str(), f))
            .unwrap_or(("", &pending_facts));
        let d = decisions
            .entry(key)
            .or_insert_with(|| decide(&p.spec, node_facts));
        let sha = ctx
            .profiles
            .get(&ObjectRef::new(node))
            .and_then(|pr| pr.status.as_ref().map(|s| s.btf.sha256.clone()))
            .unwrap_or_default();
        if sha.is_empty() || facts.representative.get(&sha) == Some(node) {
            query_nodes.insert(node.clone());
        }
        let (reported, ignored) = match believed(node, states.get(node).map(|s| &**s), &name) {
            Ok(r) => (r, None),
            Err(why) => (None, Some(why)),
        };
        if let Some(why) = facts.untrusted.get(node).or(ignored.as_ref()) {
            announce(
                ctx,
                &p,
                &format!("untrusted/{node}/{why}"),
                EventType::Warning,
                "UntrustedNodeStatus",
                &format!("node {node}: {why}"),
            )
            .await;
        }
        if let Some(why) = facts.untrusted.get(node) {
            outcomes.insert(node.clone(), NodeOutcome::Pending(why.clone()));
            continue;
        }
        let report_boot = states
            .get(node)
            .and_then(|s| s.status.as_ref())
            .and_then(|st| st.boot_id.as_deref());
        let unbelieved = match reported {
            Some(r) => discount(ctx, &p, node, r, report_boot).await,
            None => None,
        };
        if unbelieved.is_some() {
            discounted.insert(node.clone());
        }
        match d.outcome() {
            Outcome::Pending => {
                outcomes.insert(
                    node.clone(),
                    NodeOutcome::Pending(format!("waiting for {}", d.pending.join(", "))),
                );
            }
            Outcome::Unsupported => {
                let reason = d.reasons().join("; ");
                announce(
                    ctx,
                    &p,
                    &format!("unsupported/{generation}/{node}"),
                    EventType::Warning,
                    "NoEligibleVariant",
                    &format!("node {node}: {reason}"),
                )
                .await;
                outcomes.insert(node.clone(), NodeOutcome::Unsupported(reason));
            }
            Outcome::Eligible => {
                let assignment = assignment_by_key
                    .entry(key)
                    .or_insert_with(|| {
                        let by_name: HashMap<&str, _> = p
                            .spec
                            .variants
                            .iter()
                            .map(|v| (v.name.as_str(), v))
                            .collect();
                        Arc::new(ProgramAssignment {
                            name: name.clone(),
                            generation,
                            candidates: d
                                .eligible
                                .iter()
                                .filter_map(|e| by_name.get(e.name.as_str()))
                                // The operator has checked the requirements; the agent does
                                // not read them, and they would be written to every node.
                                .map(|v| bpfpoly_crds::program::Variant {
                                    requires: Default::default(),
                                    ..(*v).clone()
                                })
                                .collect(),
                            config: d.config.clone(),
                            dispatch: p.spec.dispatch.clone(),
                            fallback: p.spec.fallback.clone(),
                        })
                    })
                    .clone();
                candidates_by_node.insert(node.clone(), assignment);
                eligible.push(node.clone());
                let counted = unbelieved.is_none();
                outcomes.insert(
                    node.clone(),
                    match (ignored, unbelieved) {
                        (Some(why), _) => NodeOutcome::Ignored(why),
                        (None, Some(outcome)) => outcome,
                        (None, None) => NodeOutcome::Eligible(reported),
                    },
                );
                if let Some(r) = reported
                    .filter(|r| r.observed_generation == generation)
                    .filter(|_| counted)
                {
                    match r.phase {
                        Phase::Degraded => {
                            let why = r
                                .fallbacks
                                .last()
                                .map(|f| {
                                    format!("{} -> {} at {}: {}", f.from, f.to, f.stage, f.reason)
                                })
                                .unwrap_or_else(|| r.message.clone());
                            announce(
                                ctx,
                                &p,
                                &format!("degraded/{generation}/{node}/{why}"),
                                EventType::Warning,
                                "FellBack",
                                &format!("node {node}: {why}"),
                            )
                            .await;
                        }
                        Phase::Failed => {
                            announce(
                                ctx,
                                &p,
                                &format!("failed/{generation}/{node}"),
                                EventType::Warning,
                                "LoadFailed",
                                &format!("node {node}: {}", r.message),
                            )
                            .await;
                        }
                        _ => {}
                    }
                }
            }
        }
    }

    let progress: Vec<NodeProgress<'_>> = eligible
        .iter()
        .map(|node| {
            let st = states.get(node);
            NodeProgress {
                node,
                assigned: st.and_then(|s| {
                    s.spec
                        .programs
                        .iter()
                        .find(|a| a.name == name)
                        .map(|a| a.generation)
                }),
                // A lost node, or one rebooted since it reported, has shown nothing yet.
                reported: believed(node, st.map(|s| &**s), &name)
                    .ok()
                    .flatten()
                    .filter(|_| !discounted.contains(node.as_str()))
                    .map(|ps| (ps.observed_generation, ps.phase)),
            }
        })
        .collect();
    let rollout = plan(generation, &p.spec.rollout, &progress);
    if rollout.paused {
        announce(
            ctx,
            &p,
            &format!("paused/{generation}"),
            EventType::Warning,
            "RolloutPaused",
            &rollout.message,
        )
        .await;
    }
    ctx.metrics
        .rollout_paused
        .with_label_values(&[&name])
        .set(i64::from(rollout.paused));

    let targets = ProgramTargets {
        assignments: candidates_by_node
            .into_iter()
            .filter(|(n, _)| rollout.updated.contains(n))
            .collect(),
        keep: eligible.iter().cloned().collect(),
        queries,
        query_nodes,
    };
    publish_targets(ctx, &name, targets);

    let previous = p
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let mut status = aggregate(&Inputs {
        generation,
        nodes: &outcomes,
        plan: &rollout,
        on_no_eligible: p.spec.fallback.on_no_eligible_variant,
        previous: &previous,
        now: Time(k8s_openapi::jiff::Timestamp::now()),
    });
    for (phase, n) in [
        ("selected", status.nodes.selected),
        ("loaded", status.nodes.loaded),
        ("degraded", status.nodes.degraded),
        ("failed", status.nodes.failed),
        ("unsupported", status.nodes.unsupported),
        ("pending", status.nodes.pending),
        ("lost", status.nodes.lost),
    ] {
        ctx.metrics
            .nodes
            .with_label_values(&[name.as_str(), phase])
            .set(i64::from(n));
    }
    status.warnings = warnings;
    if p.spec.fallback.on_no_eligible_variant == OnNoEligibleVariant::Fail {
        tracing::debug!(program = %name, "nodes without an eligible variant count as failed");
    }
    write_status(ctx, &p, status).await?;
    Ok(Action::await_change())
}

/// Whether `node`'s believed report `r` still counts, from its agent's liveness: `None` when
/// it does; otherwise the outcome to show instead (lost, or waiting for a rebooted node's
/// first report), announced once per episode. A node counted again after a loss is announced
/// as returned.
async fn discount<'a>(
    ctx: &Context,
    p: &BpfPolyProgram,
    node: &str,
    r: &ProgramStatus,
    report_boot: Option<&str>,
) -> Option<NodeOutcome<'a>> {
    let last = match &r.variant {
        Some(v) => format!("{:?} ({v})", r.phase),
        None => format!("{:?}", r.phase),
    };
    match ctx.liveness.agent(node) {
        Agent::Lost { since, why } => {
            ctx.liveness.record_loss(node, since);
            announce(
                ctx,
                p,
                &format!("lost/{node}/{since}"),
                EventType::Warning,
                "NodeLost",
                &format!("node {node}: {why}; its last report ({last}) is not counted as running"),
            )
            .await;
            Some(NodeOutcome::Lost(format!("{why}; last reported {last}")))
        }
        Agent::Alive { boot_id } => {
            if let Some(why) = older_boot(node, boot_id.as_deref(), report_boot) {
                announce(
                    ctx,
                    p,
                    &format!("rebooted/{node}/{}", boot_id.unwrap_or_default()),
                    EventType::Normal,
                    "NodeRebooted",
                    &why,
                )
                .await;
                return Some(NodeOutcome::Pending(why));
            }
            if let Some(since) = ctx.liveness.last_loss(node) {
                announce(
                    ctx,
                    p,
                    &format!("returned/{node}/{since}"),
                    EventType::Normal,
                    "NodeReturned",
                    &format!(
                        "node {node}: its agent is back (lost since {since:.0}) and reports {last}"
                    ),
                )
                .await;
            }
            None
        }
    }
}

/// Replaces a program's targets and marks every node that held or holds it dirty.
fn publish_targets(ctx: &Context, name: &str, targets: ProgramTargets) {
    let mut touched: BTreeSet<String> = targets.keep.iter().cloned().collect();
    touched.extend(targets.query_nodes.iter().cloned());
    {
        let mut all = ctx
            .targets
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(old) = all.insert(name.to_string(), targets) {
            touched.extend(old.keep);
            touched.extend(old.query_nodes);
        }
    }
    // Nodes that still hold the program but are no longer selected.
    for s in ctx.states.state() {
        if s.spec.programs.iter().any(|a| a.name == name) {
            touched.insert(s.name_any());
        }
    }
    ctx.dirty.mark(touched);
}

async fn cleanup(p: Arc<BpfPolyProgram>, ctx: &Context) -> Result<Action, Error> {
    let name = p.name_any();
    publish_targets(ctx, &name, ProgramTargets::default());
    // Wait until no node still lists it in spec, or reports it as anything but Unloaded.
    let waiting: Vec<String> = ctx
        .states
        .state()
        .iter()
        .filter(|s| {
            // A status the operator does not believe cannot confirm an unload.
            let believed = crate::trust::untrusted_status(&s.name_any(), &s.metadata).is_none();
            s.spec.programs.iter().any(|a| a.name == name)
                || s.status.as_ref().is_some_and(|st| {
                    st.programs
                        .iter()
                        .any(|ps| ps.name == name && (ps.phase != Phase::Unloaded || !believed))
                })
        })
        .map(|s| s.name_any())
        .collect();
    if waiting.is_empty() {
        forget(ctx, &name);
        return Ok(Action::await_change());
    }
    let since = p
        .metadata
        .deletion_timestamp
        .as_ref()
        .map(|t| k8s_openapi::jiff::Timestamp::now().duration_since(t.0))
        .and_then(|d| Duration::try_from(d).ok())
        .unwrap_or_default();
    if since > ctx.unload_timeout {
        let msg = format!(
            "gave up waiting {}s for node(s) {} to unload; their agents may be down, and `bpfpoly-agent cleanup` removes what is left",
            ctx.unload_timeout.as_secs(),
            waiting.join(", ")
        );
        announce(
            ctx,
            &p,
            "unload-timeout",
            EventType::Warning,
            "UnloadTimeout",
            &msg,
        )
        .await;
        let mut status = p.status.clone().unwrap_or_default();
        set_condition(
            &mut status.conditions,
            p.metadata.generation.unwrap_or(0),
            "Ready",
            false,
            "UnloadTimeout",
            &msg,
        );
        let _ = write_status(ctx, &p, status).await;
        forget(ctx, &name);
        return Ok(Action::await_change());
    }
    Err(Error::UnloadPending(waiting.join(", ")))
}

/// Drops a deleted program's targets and its metric series.
fn forget(ctx: &Context, name: &str) {
    ctx.targets
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .remove(name);
    for phase in [
        "selected",
        "loaded",
        "degraded",
        "failed",
        "unsupported",
        "pending",
        "lost",
    ] {
        let _ = ctx.metrics.nodes.remove_label_values(&[name, phase]);
    }
    let _ = ctx.metrics.rollout_paused.remove_label_values(&[name]);
    let _ = ctx
        .metrics
        .status_writes_refused
        .remove_label_values(&[name]);
}
