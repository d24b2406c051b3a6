//! Time-bounded fuzzing of the API crate's small parsers (`make fuzz`, e2e/fuzz/fuzz.sh),
//! with the runner of `fuzz_crds.rs`: kernel release / version / requirement parsing, BTF
//! query parsing and config value parsing, each checked for a property beyond "never
//! panics" (round trips, ordering). Knobs as in `fuzz_crds.rs`.

#![allow(clippy::unwrap_used)]

use bpfpoly_crds::program::ConfigType;
use bpfpoly_crds::requirement::{KernelRequirement, KernelVersion, Query};
use proptest::prelude::*;

#[path = "../../test-support/fuzz_knobs.rs"]
mod fuzz_knobs;
#[path = "../../test-support/proptest_runner.rs"]
mod proptest_runner;
use proptest_runner::{fuzz, shape};

// ---------------------------------------------------------------------------------------
// Kernel releases, versions and requirements.

fn release_like() -> impl Strategy<Value = String> {
    prop_oneof![
        (
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            "[-+._a-z0-9~]{0,20}"
        )
            .prop_map(|(a, b, c, s)| format!("{a}.{b}.{c}{s}")),
        (0u64..100_000_000_000, 0u64..1000).prop_map(|(a, b)| format!("{a}.{b}")),
        "[0-9.]{0,12}[-a-z]{0,6}",
        "\\PC{0,24}",
        proptest::collection::vec(
            prop_oneof![
                Just(".".to_string()),
                "[0-9]{1,11}",
                Just(" ".into()),
                Just("-".into())
            ],
            0..8
        )
        .prop_map(|v| v.concat()),
    ]
}

fn requirement_like() -> impl Strategy<Value = String> {
    let op =
        proptest::sample::select(&[">=", ">", "<=", "<", "=", "==", "!=", "", "=>", "~", ">>"][..]);
    let ver = prop_oneof![
        (any::<u32>(), any::<u32>()).prop_map(|(a, b)| format!("{a}.{b}")),
        (any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(a, b, c)| format!("{a}.{b}.{c}")),
        "[0-9. ]{0,10}",
        (0u64..u64::MAX).prop_map(|a| format!("{a}.1")),
    ];
    let comparator = (op, "[ ]{0,2}", ver).prop_map(|(o, s, v)| format!("{o}{s}{v}"));
    prop_oneof![
        4 => proptest::collection::vec(comparator, 1..4).prop_map(|v| v.join(", ")),
        1 => "\\PC{0,30}",
        1 => "[<>=!0-9., ]{0,30}",
    ]
}

#[test]
fn fuzz_kernel_versions_and_requirements() {
    let strategy = (
        release_like(),
        requirement_like(),
        (any::<u32>(), any::<u32>(), any::<u32>()),
    );
    fuzz(
        "kernel release/requirement parsing",
        strategy,
        |(release, req, (a, b, c))| {
            let mut shapes = Vec::new();
            // A release with a numeric prefix parses to exactly that prefix.
            let v = KernelVersion {
                major: a,
                minor: b,
                patch: c,
            };
            prop_assert_eq!(
                KernelVersion::from_release(&format!("{a}.{b}.{c}-{release}")),
                Ok(v)
            );
            prop_assert_eq!(KernelVersion::parse_strict(&v.to_string()), Ok(v));
            match KernelVersion::from_release(&release) {
                Ok(_) => shapes.push("release ok".into()),
                Err(e) => shapes.push(shape(&e)),
            }
            let _ = KernelVersion::parse_strict(&release);
            match KernelRequirement::parse(&req) {
                Ok(r) => {
                    // Display round-trips, and matching follows version order.
                    let again = KernelRequirement::parse(&r.to_string());
                    prop_assert_eq!(again.as_ref(), Ok(&r), "round trip of {:?}", req);
                    let all = r.comparators.iter().all(|(op, want)| {
                        let ord = v.cmp(want);
                        match op {
                            bpfpoly_crds::requirement::Op::Ge => ord.is_ge(),
                            bpfpoly_crds::requirement::Op::Gt => ord.is_gt(),
                            bpfpoly_crds::requirement::Op::Le => ord.is_le(),
                            bpfpoly_crds::requirement::Op::Lt => ord.is_lt(),
                            bpfpoly_crds::requirement::Op::Eq => ord.is_eq(),
                            bpfpoly_crds::requirement::Op::Ne => ord.is_ne(),
                        }
                    });
                    prop_assert_eq!(r.matches(v), all);
                    shapes.push(format!(
                        "requirement ok ({} comparators)",
                        r.comparators.len().min(3)
                    ));
                }
                Err(e) => shapes.push(shape(&e)),
            }
            Ok(shapes)
        },
    );
}

// ---------------------------------------------------------------------------------------
// BTF queries and config values.

fn query_like() -> impl Strategy<Value = String> {
    let kind =
        proptest::sample::select(&["type", "field", "enum", "func", "helper", "", "Type", "x"][..]);
    let word = prop_oneof![
        "[a-z_][a-z0-9_]{0,12}",
        proptest::sample::select(
            &[
                "struct",
                "union",
                "enum",
                "typedef",
                "xdp",
                "tracing",
                "bpf_ringbuf_output",
                "ringbuf_output",
                "bpf_map_lookup_elem"
            ][..]
        )
        .prop_map(String::from),
        "\\PC{0,4}",
    ];
    let sep = proptest::sample::select(&[" ", "  ", ".", ":", "", "\t", ". "][..]);
    let body = proptest::collection::vec((word, sep), 0..5).prop_map(|v| {
        v.into_iter()
            .map(|(w, s)| format!("{w}{s}"))
            .collect::<String>()
    });
    prop_oneof![
        4 => (kind, body).prop_map(|(k, b)| format!("{k}:{b}")),
        1 => "\\PC{0,30}",
    ]
}

#[test]
fn fuzz_queries_and_config_values() {
    let types = [
        ConfigType::Bool,
        ConfigType::U8,
        ConfigType::U16,
        ConfigType::U32,
        ConfigType::U64,
        ConfigType::I32,
        ConfigType::I64,
    ];
    let value = prop_oneof![
        any::<i128>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| format!("{n:#x}")),
        any::<i64>().prop_map(|n| format!(" {n} ")),
        "[-+0-9xXa-fA-F ]{0,22}",
        "\\PC{0,10}",
    ];
    let strategy = (query_like(), value, 0..types.len());
    fuzz("query and config value parsing", strategy, |(q, val, t)| {
        let mut shapes = Vec::new();
        match Query::parse(&q) {
            Ok(parsed) => {
                // The normal form parses to the same query.
                prop_assert_eq!(Query::parse(&parsed.to_string()), Ok(parsed.clone()));
                shapes.push(format!(
                    "query ok {}",
                    parsed.to_string().split(':').next().unwrap_or("")
                ));
            }
            Err(e) => shapes.push(shape(&e)),
        }
        let ty = types[t];
        match ty.parse_value(&val) {
            Ok(parsed) => {
                // An accepted integer is in range and keeps its value.
                let bytes = parsed.to_ne_bytes();
                prop_assert_eq!(bytes.len(), ty.size());
                if ty != ConfigType::Bool && !val.trim().to_ascii_lowercase().contains('x') {
                    let want: i128 = val.trim().parse().unwrap();
                    let mut buf = [0u8; 16];
                    buf[..bytes.len()].copy_from_slice(&bytes);
                    let got = if ty.signed() {
                        let shift = 128 - 8 * bytes.len() as u32;
                        (i128::from_ne_bytes(buf) << shift) >> shift
                    } else {
                        i128::from_ne_bytes(buf)
                    };
                    prop_assert_eq!(got, want, "{:?} as {}", val, ty.as_str());
                }
                shapes.push(format!("value ok {}", ty.as_str()));
            }
            Err(e) => shapes.push(shape(&e)),
        }
        Ok(shapes)
    });
}
