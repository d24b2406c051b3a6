//! Property tests of the selection engine and of the parsers' robustness.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};

use bpfpoly_crds::document::check_stream;
use bpfpoly_crds::program::{
    Attach, BpfPolyProgramSpec, Bytecode, ConfigField, ConfigType, FallbackPolicy, ProgramRef,
    Requirements, Rollout, Variant, XdpMode, XdpTarget,
};
use bpfpoly_crds::requirement::{KernelRequirement, KernelVersion, Query};
use bpfpoly_crds::select::{decide, program_queries, NodeFacts, Outcome};
use proptest::prelude::*;

const TYPES: &[&str] = &[
    "struct task_struct",
    "struct linux_binprm",
    "struct bpf_iter_num",
];
const FIELDS: &[&str] = &["struct task_struct.loginuid", "struct sk_buff.tstamp"];
const PROG_TYPES: &[&str] = &["xdp", "tracing", "ext", "kprobe"];
const MAP_TYPES: &[&str] = &["ringbuf", "prog_array"];
const KERNELS: &[&str] = &[">=5.8", "<6.0", ">=6.1, <6.10", "=6.18.44"];

fn subset(pool: &'static [&'static str]) -> impl Strategy<Value = Vec<String>> {
    proptest::sample::subsequence(pool, 0..=pool.len())
        .prop_map(|v| v.into_iter().map(String::from).collect())
}

fn requirements() -> impl Strategy<Value = Requirements> {
    (
        proptest::option::of(proptest::sample::select(KERNELS)),
        proptest::option::of(Just(true)),
        subset(TYPES),
        subset(FIELDS),
        subset(PROG_TYPES),
        subset(MAP_TYPES),
    )
        .prop_map(
            |(kernel, btf, types, fields, program_types, map_types)| Requirements {
                kernel: kernel.map(String::from),
                btf,
                types,
                fields,
                program_types,
                map_types,
                ..Requirements::default()
            },
        )
}

fn spec() -> impl Strategy<Value = BpfPolyProgramSpec> {
    (
        proptest::collection::vec(requirements(), 1..6),
        proptest::collection::vec(
            (
                proptest::option::of(requirements()),
                proptest::option::of(Just("false")),
            ),
            0..4,
        ),
    )
        .prop_map(|(reqs, cfgs)| BpfPolyProgramSpec {
            node_selector: None,
            variants: reqs
                .into_iter()
                .enumerate()
                .map(|(i, requires)| Variant {
                    name: format!("v{i}"),
                    bytecode: Bytecode {
                        builtin: Some("packet-classifier-xdp".into()),
                        ..Bytecode::default()
                    },
                    programs: vec![ProgramRef {
                        name: "classify".into(),
                        attach: Some(Attach {
                            xdp: Some(XdpTarget {
                                interfaces: vec!["eth0".into()],
                                mode: XdpMode::Skb,
                            }),
                            ..Attach::default()
                        }),
                    }],
                    requires,
                    dispatch_mechanism: None,
                    handler_bytecode: None,
                })
                .collect(),
            config: cfgs
                .into_iter()
                .enumerate()
                .map(|(i, (requires, fallback))| ConfigField {
                    name: format!("c{i}"),
                    type_: ConfigType::Bool,
                    value: "true".into(),
                    fallback: fallback.map(String::from),
                    requires,
                })
                .collect(),
            dispatch: None,
            fallback: FallbackPolicy::default(),
            rollout: Rollout::default(),
        })
}

/// A node that has answered every query the program needs.
fn facts_for(spec: &BpfPolyProgramSpec) -> impl Strategy<Value = NodeFacts> {
    let queries: Vec<String> = program_queries(spec).iter().map(Query::to_string).collect();
    (
        (4u32..7, 0u32..20, 0u32..50),
        any::<bool>(),
        subset(PROG_TYPES),
        subset(MAP_TYPES),
        proptest::collection::vec(any::<bool>(), queries.len()),
    )
        .prop_map(
            move |((major, minor, patch), btf, pts, mts, bits)| NodeFacts {
                kernel: Some(KernelVersion {
                    major,
                    minor,
                    patch,
                }),
                release: format!("{major}.{minor}.{patch}-test"),
                btf,
                program_types: pts.into_iter().collect(),
                observed_program_types: BTreeSet::new(),
                map_types: mts.into_iter().collect(),
                answers: queries
                    .iter()
                    .cloned()
                    .zip(bits)
                    .collect::<BTreeMap<_, _>>(),
                reported: true,
                features: Default::default(),
            },
        )
}

/// The oracle: does a requirement set hold, computed directly from the facts.
fn holds(r: &Requirements, f: &NodeFacts) -> bool {
    let kernel_ok = r.kernel.as_ref().is_none_or(|k| {
        KernelRequirement::parse(k)
            .unwrap()
            .matches(f.kernel.unwrap())
    });
    let ans =
        |prefix: &str, list: &[String]| list.iter().all(|x| f.answers[&format!("{prefix}:{x}")]);
    kernel_ok
        && (r.btf != Some(true) || f.btf)
        && ans("type", &r.types)
        && ans("field", &r.fields)
        && r.program_types.iter().all(|p| f.program_types.contains(p))
        && r.map_types.iter().all(|m| f.map_types.contains(m))
}

fn spec_and_facts() -> impl Strategy<Value = (BpfPolyProgramSpec, NodeFacts)> {
    spec().prop_flat_map(|s| {
        let f = facts_for(&s);
        (Just(s), f)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn eligible_variants_satisfy_requirements_in_table_order((spec, facts) in spec_and_facts()) {
        let d = decide(&spec, &facts);
        prop_assert!(d.pending.is_empty(), "all queries were answered: {:?}", d.pending);
        let order: Vec<usize> = d.eligible.iter()
            .map(|e| spec.variants.iter().position(|v| v.name == e.name).unwrap())
            .collect();
        prop_assert!(order.windows(2).all(|w| w[0] < w[1]), "table order kept: {:?}", order);
        for v in &spec.variants {
            let eligible = d.eligible.iter().any(|e| e.name == v.name);
            let rejected = d.rejected.iter().find(|r| r.name == v.name);
            prop_assert_eq!(eligible, holds(&v.requires, &facts), "variant {}", v.name);
            prop_assert_eq!(eligible, rejected.is_none());
            if let Some(r) = rejected {
                prop_assert!(!r.failed.holds);
            }
        }
        for e in &d.eligible {
            prop_assert!(e.trace.iter().all(|c| c.holds));
        }
    }

    #[test]
    fn config_falls_back_iff_its_requirement_fails((spec, facts) in spec_and_facts()) {
        let d = decide(&spec, &facts);
        for c in &spec.config {
            let ok = c.requires.as_ref().is_none_or(|r| holds(r, &facts));
            let resolved = d.config.iter().find(|r| r.name == c.name);
            match (ok, &c.fallback, resolved) {
                (true, _, Some(r)) => {
                    prop_assert!(!r.fell_back);
                    prop_assert_eq!(&r.value, &c.value);
                }
                (false, Some(fb), Some(r)) => {
                    prop_assert!(r.fell_back);
                    prop_assert_eq!(&r.value, fb);
                    prop_assert!(r.reason.is_some());
                }
                (false, None, None) => {
                    prop_assert!(d.config_blockers.iter().any(|b| b.contains(&c.name)));
                    prop_assert_eq!(d.outcome(), Outcome::Unsupported);
                }
                other => prop_assert!(false, "config {}: unexpected {:?}", c.name, other),
            }
        }
    }

    #[test]
    fn a_missing_answer_makes_the_decision_pending((spec, mut facts) in spec_and_facts()) {
        let queries = program_queries(&spec);
        prop_assume!(!queries.is_empty());
        let q = queries.iter().next().unwrap().to_string();
        facts.answers.remove(&q);
        let d = decide(&spec, &facts);
        for v in &spec.variants {
            let alone = BpfPolyProgramSpec { variants: vec![v.clone()], config: vec![], ..spec.clone() };
            let needs_q = program_queries(&alone).iter().any(|x| x.to_string() == q);
            if !needs_q {
                continue;
            }
            prop_assert!(!d.eligible.iter().any(|e| e.name == v.name), "{} eligible without {}", v.name, q);
            if !d.rejected.iter().any(|r| r.name == v.name) {
                prop_assert!(d.pending.contains(&q), "{} neither rejected nor pending on {}", v.name, q);
                prop_assert_eq!(d.outcome(), Outcome::Pending);
            }
        }
    }

    #[test]
    fn parsers_never_panic(s in "\\PC{0,64}") {
        let _ = KernelVersion::from_release(&s);
        let _ = KernelRequirement::parse(&s);
        let _ = Query::parse(&s);
        for t in [ConfigType::Bool, ConfigType::U8, ConfigType::I64, ConfigType::U64] {
            let _ = t.parse_value(&s);
        }
    }

    #[test]
    fn validation_never_panics_on_arbitrary_yaml(s in "\\PC{0,400}") {
        let _ = check_stream(&s);
    }

    #[test]
    fn validation_never_panics_on_mutated_samples(cut in 0usize..2000, junk in "[ -~\\n]{0,20}") {
        let sample = include_str!("../examples/packet-classifier.yaml");
        let cut = cut.min(sample.len());
        let cut = (0..=cut).rev().find(|i| sample.is_char_boundary(*i)).unwrap();
        let text = format!("{}{}{}", &sample[..cut], junk, &sample[cut..]);
        let _ = check_stream(&text);
    }
}

#[test]
fn no_profile_means_pending_not_failed() {
    let spec: BpfPolyProgramSpec = serde_yaml::from_str::<bpfpoly_crds::BpfPolyProgram>(
        include_str!("../examples/exec-tracer.yaml"),
    )
    .unwrap()
    .spec;
    let d = decide(&spec, &NodeFacts::default());
    assert_eq!(d.outcome(), Outcome::Pending);
    assert!(d.eligible.is_empty() && d.rejected.is_empty());
}

#[test]
fn old_kernel_without_loginuid_explains_the_fallback() {
    let spec: BpfPolyProgramSpec = serde_yaml::from_str::<bpfpoly_crds::BpfPolyProgram>(
        include_str!("../examples/exec-tracer.yaml"),
    )
    .unwrap()
    .spec;
    let mut answers: BTreeMap<String, bool> = program_queries(&spec)
        .iter()
        .map(|q| (q.to_string(), true))
        .collect();
    answers.insert("field:struct task_struct.loginuid".into(), false);
    let facts = NodeFacts {
        kernel: KernelVersion::from_release("6.1.0-54-cloud-amd64").ok(),
        release: "6.1.0-54-cloud-amd64".into(),
        btf: true,
        program_types: ["kprobe", "tracepoint", "tracing"].map(String::from).into(),
        map_types: ["ringbuf"].map(String::from).into(),
        answers,
        reported: true,
        ..NodeFacts::default()
    };
    let d = decide(&spec, &facts);
    assert_eq!(d.outcome(), Outcome::Eligible);
    let names: Vec<&str> = d.eligible.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["kprobe", "tp-btf", "tracepoint"]);
    let loginuid = d.config.iter().find(|c| c.name == "read_loginuid").unwrap();
    assert!(loginuid.fell_back);
    assert_eq!(loginuid.value, "false");
    assert_eq!(
        loginuid.reason.as_deref(),
        Some("field struct task_struct.loginuid missing on this kernel")
    );
    let ringbuf = d.config.iter().find(|c| c.name == "use_ringbuf").unwrap();
    assert!(!ringbuf.fell_back);
}

#[test]
fn rejected_variant_names_the_failing_fact() {
    let spec: BpfPolyProgramSpec = serde_yaml::from_str::<bpfpoly_crds::BpfPolyProgram>(
        include_str!("../examples/exec-tracer.yaml"),
    )
    .unwrap()
    .spec;
    let answers = program_queries(&spec)
        .iter()
        .map(|q| (q.to_string(), true))
        .collect();
    let facts = NodeFacts {
        kernel: KernelVersion::from_release("5.4.0-150-generic").ok(),
        release: "5.4.0-150-generic".into(),
        btf: false,
        program_types: ["kprobe", "tracepoint"].map(String::from).into(),
        answers,
        reported: true,
        ..NodeFacts::default()
    };
    let d = decide(&spec, &facts);
    assert_eq!(
        d.reasons(),
        [
            "variant kprobe: kernel >=5.8 kernel is 5.4.0 (5.4.0-150-generic)",
            "variant tp-btf: kernel >=5.5 kernel is 5.4.0 (5.4.0-150-generic)",
        ]
    );
    assert_eq!(d.eligible.len(), 1);
    let ringbuf = d.config.iter().find(|c| c.name == "use_ringbuf").unwrap();
    assert!(ringbuf.fell_back, "no ringbuf map type on this node");
    assert_eq!(
        ringbuf.reason.as_deref(),
        Some("map type ringbuf not supported on this kernel (probed)")
    );
}
