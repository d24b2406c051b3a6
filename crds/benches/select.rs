//! The selection engine (part 4 of `make bench`): `select::decide` for the two sample
//! programs against a full `NodeFacts` (a 6.18 kernel with BTF, every program and map
//! type, every query the program asks answered true), next to its anchor: `serde_json`
//! deserializing the same `BpfPolyProgramSpec` from JSON (what the operator pays for
//! each program it receives anyway).
//!
//! `cargo bench -p bpfpoly-crds --bench select`; the figures land in
//! `target/criterion/select/*/new/estimates.json` (e2e/bench/bench.sh reads them).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::Duration;

use bpfpoly_crds::requirement::{KernelVersion, MAP_TYPES, PROGRAM_TYPES};
use bpfpoly_crds::select::{decide, program_queries, NodeFacts};
use bpfpoly_crds::{BpfPolyProgram, BpfPolyProgramSpec};
use criterion::{criterion_group, criterion_main, Criterion};

const SAMPLES: [(&str, &str); 2] = [
    ("exec-tracer", include_str!("../examples/exec-tracer.yaml")),
    (
        "packet-classifier",
        include_str!("../examples/packet-classifier.yaml"),
    ),
];

fn spec(yaml: &str) -> BpfPolyProgramSpec {
    serde_yaml::from_str::<BpfPolyProgram>(yaml)
        .expect("sample program")
        .spec
}

/// A node that satisfies everything `spec` can ask.
fn full_facts(spec: &BpfPolyProgramSpec) -> NodeFacts {
    let release = "6.18.44-fc-v669";
    NodeFacts {
        kernel: Some(KernelVersion::from_release(release).expect("release")),
        release: release.to_owned(),
        btf: true,
        program_types: PROGRAM_TYPES.iter().map(|(n, _)| (*n).to_owned()).collect(),
        observed_program_types: Default::default(),
        map_types: MAP_TYPES.iter().map(|(n, _)| (*n).to_owned()).collect(),
        answers: program_queries(spec)
            .iter()
            .map(|q| (q.to_string(), true))
            .collect(),
        reported: true,
        features: Default::default(),
    }
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("select");
    group
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(40);
    for (name, yaml) in SAMPLES {
        let spec = spec(yaml);
        let facts = full_facts(&spec);
        let d = decide(&spec, &facts);
        assert!(
            !d.eligible.is_empty() && d.pending.is_empty(),
            "{name}: a full node must have an eligible variant and nothing pending: {d:?}"
        );
        group.bench_function(format!("decide/{name}"), |b| {
            b.iter(|| decide(black_box(&spec), black_box(&facts)))
        });
        let json = serde_json::to_string(&spec).unwrap();
        group.bench_function(format!("serde_json_spec/{name}"), |b| {
            b.iter(|| serde_json::from_str::<BpfPolyProgramSpec>(black_box(&json)).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
