//! One program applied to the cluster: its spec checked, the selected nodes each judged
//! from their facts and reports (eligible, unsupported, pending, lost, ignored), the rollout
//! planned, the targets published for the node writer, and the status aggregated. Top-down:
//! [`apply`] reads as the list of those steps.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use bpfpoly_crds::program::OnNoEligibleVariant;
use bpfpoly_crds::select::{decide, program_queries, Decision, NodeFacts, Outcome};
use bpfpoly_crds::state::{AssignedProgram, ConfigFallback, Phase, ProgramStatus};
use bpfpoly_crds::validate::{spec_warnings, validate_program};
use bpfpoly_crds::{BpfNodeState, BpfPolyProgram, BpfPolyProgramStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::ResourceExt;

use crate::aggregate::{aggregate, Inputs, NodeOutcome};
use crate::context::{Context, ProgramTargets};
use crate::facts::FactsIndex;
use crate::liveness::{older_boot, Agent};
use crate::rollout::{plan, NodeProgress, Plan};
use crate::status::{announce, no_nodes_message, set_condition, write_status};
use crate::Error;

/// Node states by node name.
type States = HashMap<String, Arc<BpfNodeState>>;

/// Applies one program (the finalizer's Apply).
pub async fn apply(p: Arc<BpfPolyProgram>, ctx: &Context) -> Result<Action, Error> {
    let generation = p.metadata.generation.unwrap_or(0);
    let problems = validate_program(&p);
    if !problems.is_empty() {
        return refuse_invalid(ctx, &p, generation, &problems).await;
    }
    let warnings = warn_spec(ctx, &p, generation).await;
    let facts = FactsIndex::build(&ctx.profiles.state());
    ctx.metrics
        .ignored_node_status
        .with_label_values(&["profile"])
        .set(facts.untrusted.len() as i64);
    let selected = select_nodes(ctx, &p, generation).await;
    let states = node_states(ctx);
    let mut pass = Pass::new(&p, &facts, &states);
    for node in &selected {
        pass.judge(ctx, node).await;
    }
    let rollout = plan_rollout(ctx, &p, generation, &pass, &states).await;
    let name = p.name_any();
    let targets = ProgramTargets {
        assignments: std::mem::take(&mut pass.assignments)
            .into_iter()
            .filter(|(n, _)| rollout.updated.contains(n))
            .collect(),
        keep: pass.eligible.iter().cloned().collect(),
        queries: program_queries(&p.spec)
            .iter()
            .map(ToString::to_string)
            .collect(),
        query_nodes: std::mem::take(&mut pass.query_nodes),
    };
    ctx.publish_targets(&name, targets);
    let mut status = summarize(ctx, &p, generation, &pass.outcomes, &rollout);
    status.warnings = warnings;
    if p.spec.fallback.on_no_eligible_variant == OnNoEligibleVariant::Fail {
        tracing::debug!(program = %name, "nodes without an eligible variant count as failed");
    }
    write_status(ctx, &p, status).await?;
    Ok(Action::await_change())
}

/// An invalid spec: Ready False with every problem, told in an Event. Whatever runs stays:
/// an invalid spec never removes a working version.
async fn refuse_invalid(
    ctx: &Context,
    p: &BpfPolyProgram,
    generation: i64,
    problems: &[impl ToString],
) -> Result<Action, Error> {
    let message = problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    announce(
        ctx,
        p,
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
    write_status(ctx, p, status).await?;
    Ok(Action::await_change())
}

/// The spec's warnings, told in one Event per generation.
async fn warn_spec(ctx: &Context, p: &BpfPolyProgram, generation: i64) -> Vec<String> {
    let warnings: Vec<String> = spec_warnings(&p.spec)
        .iter()
        .map(ToString::to_string)
        .collect();
    if !warnings.is_empty() {
        announce(
            ctx,
            p,
            &format!("warnings/{generation}"),
            EventType::Warning,
            "SpecWarning",
            &warnings.join("; "),
        )
        .await;
    }
    warnings
}

/// The nodes `spec.nodeSelector` selects, sorted; none selected is told in an Event.
async fn select_nodes(ctx: &Context, p: &BpfPolyProgram, generation: i64) -> Vec<String> {
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
            p,
            &format!("no-nodes/{generation}"),
            EventType::Warning,
            "NoNodesSelected",
            &no_nodes_message(p),
        )
        .await;
    }
    selected
}

/// The node states by name, with the count of untrusted ones in the metrics.
fn node_states(ctx: &Context) -> States {
    let states: States = ctx
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
    states
}

/// One pass of a program over its selected nodes: what each one is, and what it gets.
struct Pass<'a> {
    p: &'a BpfPolyProgram,
    name: String,
    generation: i64,
    facts: &'a FactsIndex,
    states: &'a States,
    /// Facts of a node without a profile yet.
    pending_facts: NodeFacts,
    /// Decisions by decision-sharing key: nodes with the same facts decide once.
    decisions: HashMap<&'a str, Decision>,
    /// Assignments by decision-sharing key (one object shared by all its nodes).
    by_key: HashMap<&'a str, Arc<AssignedProgram>>,
    outcomes: BTreeMap<String, NodeOutcome<'a>>,
    /// Eligible nodes, in selection order.
    eligible: Vec<String>,
    /// Nodes asked to answer the program's queries (one per BTF).
    query_nodes: HashSet<String>,
    /// The assignment of each eligible node.
    assignments: HashMap<String, Arc<AssignedProgram>>,
    /// Nodes whose report does not count: a lost agent, or a report from an older boot.
    discounted: HashSet<String>,
}

impl<'a> Pass<'a> {
    fn new(p: &'a BpfPolyProgram, facts: &'a FactsIndex, states: &'a States) -> Self {
        Self {
            p,
            name: p.name_any(),
            generation: p.metadata.generation.unwrap_or(0),
            facts,
            states,
            pending_facts: NodeFacts::default(),
            decisions: HashMap::new(),
            by_key: HashMap::new(),
            outcomes: BTreeMap::new(),
            eligible: Vec::new(),
            query_nodes: HashSet::new(),
            assignments: HashMap::new(),
            discounted: HashSet::new(),
        }
    }

    /// Judges one selected node: its decision from its facts, whether its report is
    /// believed and still counts, and its outcome.
    async fn judge(&mut self, ctx: &Context, node: &String) {
        let (key, node_facts) = match self.facts.by_node.get(node) {
            Some(e) => (e.0.as_str(), &e.1),
            None => ("", &self.pending_facts),
        };
        if !self.decisions.contains_key(key) {
            let d = decide(&self.p.spec, node_facts);
            self.decisions.insert(key, d);
        }
        if self.answers_queries(ctx, node) {
            self.query_nodes.insert(node.clone());
        }
        let state = self.states.get(node).map(|s| &**s);
        let (reported, ignored) = match believed(node, state, &self.name) {
            Ok(r) => (r, None),
            Err(why) => (None, Some(why)),
        };
        if let Some(why) = self.facts.untrusted.get(node).or(ignored.as_ref()) {
            announce(
                ctx,
                self.p,
                &format!("untrusted/{node}/{why}"),
                EventType::Warning,
                "UntrustedNodeStatus",
                &format!("node {node}: {why}"),
            )
            .await;
        }
        if let Some(why) = self.facts.untrusted.get(node) {
            self.outcomes
                .insert(node.clone(), NodeOutcome::Pending(why.clone()));
            return;
        }
        let report_boot = state
            .and_then(|s| s.status.as_ref())
            .and_then(|st| st.boot_id.as_deref());
        let unbelieved = match reported {
            Some(r) => discount(ctx, self.p, node, r, report_boot).await,
            None => None,
        };
        if unbelieved.is_some() {
            self.discounted.insert(node.clone());
        }
        let d = &self.decisions[key];
        match d.outcome() {
            Outcome::Pending => {
                let why = format!("waiting for {}", d.pending.join(", "));
                self.outcomes
                    .insert(node.clone(), NodeOutcome::Pending(why));
            }
            Outcome::Unsupported => {
                let reason = d.reasons().join("; ");
                announce(
                    ctx,
                    self.p,
                    &format!("unsupported/{}/{node}", self.generation),
                    EventType::Warning,
                    "NoEligibleVariant",
                    &format!("node {node}: {reason}"),
                )
                .await;
                self.outcomes
                    .insert(node.clone(), NodeOutcome::Unsupported(reason));
            }
            Outcome::Eligible => {
                let assignment = self.assignment(key);
                self.assignments.insert(node.clone(), assignment);
                self.eligible.push(node.clone());
                let counted = unbelieved.is_none();
                let outcome = match (ignored, unbelieved) {
                    (Some(why), _) => NodeOutcome::Ignored(why),
                    (None, Some(outcome)) => outcome,
                    (None, None) => NodeOutcome::Eligible(reported),
                };
                self.outcomes.insert(node.clone(), outcome);
                if let Some(r) = reported
                    .filter(|r| r.observed_generation == self.generation)
                    .filter(|_| counted)
                {
                    announce_report(ctx, self.p, self.generation, node, r).await;
                }
            }
        }
    }

    /// Whether `node` answers the program's queries: the representative of its BTF, or a
    /// node whose BTF is not known yet.
    fn answers_queries(&self, ctx: &Context, node: &String) -> bool {
        let sha = ctx
            .profiles
            .get(&ObjectRef::new(node))
            .and_then(|pr| pr.status.as_ref().map(|s| s.btf.sha256.clone()))
            .unwrap_or_default();
        sha.is_empty() || self.facts.representative.get(&sha) == Some(node)
    }

    /// The assignment of the nodes that share decision `key`: the names of the eligible
    /// variants in table order and the config globals that fell back, with why. (The agent
    /// reads the rest from the program at this generation.)
    fn assignment(&mut self, key: &'a str) -> Arc<AssignedProgram> {
        if let Some(a) = self.by_key.get(key) {
            return a.clone();
        }
        let d = &self.decisions[key];
        let mut config_fallbacks: Vec<ConfigFallback> = d
            .config
            .iter()
            .filter(|c| c.fell_back)
            .map(|c| ConfigFallback {
                name: c.name.clone(),
                reason: c.reason.clone().unwrap_or_default(),
            })
            .collect();
        // Sorted as a node state reads them back (see `BpfNodeStateSpec`'s stored form), so
        // that what the writer wants equals what it has written.
        config_fallbacks.sort_by(|a, b| a.name.cmp(&b.name));
        let a = Arc::new(AssignedProgram {
            name: self.name.clone(),
            generation: self.generation,
            variants: d.eligible.iter().map(|e| e.name.clone()).collect(),
            config_fallbacks,
        });
        self.by_key.insert(key, a.clone());
        a
    }
}

/// A counted report of this generation that fell back or failed, told in an Event.
async fn announce_report(
    ctx: &Context,
    p: &BpfPolyProgram,
    generation: i64,
    node: &str,
    r: &ProgramStatus,
) {
    match r.phase {
        Phase::Degraded => {
            let why = r
                .fallbacks
                .last()
                .map(|f| format!("{} -> {} at {}: {}", f.from, f.to, f.stage, f.reason))
                .unwrap_or_else(|| r.message.clone());
            announce(
                ctx,
                p,
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
                p,
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

/// The rollout plan over the eligible nodes, from what each was assigned and reported; a
/// pause is told in an Event and in the metrics.
async fn plan_rollout(
    ctx: &Context,
    p: &BpfPolyProgram,
    generation: i64,
    pass: &Pass<'_>,
    states: &States,
) -> Plan {
    let name = &pass.name;
    let progress: Vec<NodeProgress<'_>> = pass
        .eligible
        .iter()
        .map(|node| {
            let st = states.get(node);
            NodeProgress {
                node,
                assigned: st.and_then(|s| {
                    s.spec
                        .programs
                        .iter()
                        .find(|a| &a.name == name)
                        .map(|a| a.generation)
                }),
                // A lost node, or one rebooted since it reported, has shown nothing yet.
                reported: believed(node, st.map(|s| &**s), name)
                    .ok()
                    .flatten()
                    .filter(|_| !pass.discounted.contains(node.as_str()))
                    .map(|ps| (ps.observed_generation, ps.phase)),
            }
        })
        .collect();
    let rollout = plan(generation, &p.spec.rollout, &progress);
    if rollout.paused {
        announce(
            ctx,
            p,
            &format!("paused/{generation}"),
            EventType::Warning,
            "RolloutPaused",
            &rollout.message,
        )
        .await;
    }
    ctx.metrics
        .rollout_paused
        .with_label_values(&[name])
        .set(i64::from(rollout.paused));
    rollout
}

/// The program's status from the node outcomes and the plan, with the node counts in the
/// metrics.
fn summarize(
    ctx: &Context,
    p: &BpfPolyProgram,
    generation: i64,
    outcomes: &BTreeMap<String, NodeOutcome<'_>>,
    rollout: &Plan,
) -> BpfPolyProgramStatus {
    let name = p.name_any();
    let previous = p
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let status = aggregate(&Inputs {
        generation,
        nodes: outcomes,
        plan: rollout,
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
    status
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
