//! Time-bounded fuzzing of the API crate's parsers (`make fuzz`, e2e/fuzz/fuzz.sh): proptest
//! strategies run in chunks until a time budget is spent, each chunk with its own seed,
//! so one test covers as many cases as the budget allows and a failure still shrinks.
//!
//! Targets: CR validation (`check_stream` on byte-level mutations of every sample and
//! invalid sample, `check_value` on structural mutations of their JSON trees), kernel
//! release / version / requirement parsing, BTF query parsing, config value parsing.
//! Beyond "never panics", each target checks a property that must hold on any input
//! (round trips, agreement between the text and tree paths, ordering).
//!
//! Knobs: `BPFPOLY_FUZZ_SECS` (seconds per target, default 2: cheap enough for
//! `cargo test`), `BPFPOLY_FUZZ_SEED` (reproduce a run), `BPFPOLY_FUZZ_REPORT` (a file
//! each target appends one JSON line to: executions, distinct outcomes, seconds).
//! "Distinct outcomes" is a cheap coverage proxy: error messages with numbers and quoted
//! values masked, so each one stands for one validation branch reached.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use bpfpoly_crds::document::{check_stream, check_value};
use bpfpoly_crds::program::ConfigType;
use bpfpoly_crds::requirement::{KernelRequirement, KernelVersion, Query};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use serde_json::Value;

// ---------------------------------------------------------------------------------------
// The time-bounded runner.

#[path = "../../test-support/fuzz_knobs.rs"]
mod fuzz_knobs;
use fuzz_knobs::{base_seed, budget};

/// Masks numbers and quoted values: one string per message shape.
fn shape(message: &str) -> String {
    let mut out = String::new();
    let mut quoted = false;
    let mut prev_digit = false;
    let mut escaped = false;
    for c in message.chars() {
        if quoted {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                quoted = false;
                out.push_str("Q\"");
            }
            continue;
        }
        if c == '"' {
            quoted = true;
            out.push('"');
            continue;
        }
        if c.is_ascii_digit() {
            if !prev_digit {
                out.push('N');
            }
            prev_digit = true;
            continue;
        }
        prev_digit = false;
        out.push(c);
    }
    out.chars().take(160).collect()
}

/// Runs `test` on values of `strategy` until the budget is spent; reports executions and
/// distinct outcomes (the shapes `test` returns).
fn fuzz<S: Strategy>(
    name: &str,
    strategy: S,
    test: impl Fn(S::Value) -> Result<Vec<String>, TestCaseError>,
) where
    S::Value: std::fmt::Debug,
{
    let seed = base_seed();
    let executions = AtomicU64::new(0);
    let outcomes = Mutex::new(BTreeSet::new());
    let started = Instant::now();
    let deadline = started + budget();
    let mut chunk = 0u64;
    while Instant::now() < deadline {
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&seed.to_le_bytes());
        bytes[8..].copy_from_slice(&chunk.to_le_bytes());
        let config = Config {
            cases: 256,
            failure_persistence: None,
            max_shrink_iters: 4096,
            ..Config::default()
        };
        let mut runner =
            TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::XorShift, &bytes));
        let result = runner.run(&strategy, |value| {
            executions.fetch_add(1, Ordering::Relaxed);
            let shapes = test(value)?;
            outcomes.lock().unwrap().extend(shapes);
            Ok(())
        });
        if let Err(e) = result {
            panic!("fuzz {name}: seed {seed} chunk {chunk}: {e}");
        }
        chunk += 1;
    }
    let secs = started.elapsed().as_secs_f64();
    let n = executions.load(Ordering::Relaxed);
    let distinct = outcomes.lock().unwrap().len();
    println!(
        "fuzz {name}: {n} executions in {secs:.1} s ({:.0}/s), {distinct} distinct outcomes, seed {seed}",
        n as f64 / secs
    );
    if let Ok(path) = std::env::var("BPFPOLY_FUZZ_REPORT") {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            // One write per line: targets run on parallel threads and append to one file.
            let _ = f.write_all(
                format!(
                    "{}\n",
                    serde_json::json!({"crate": "bpfpoly-crds", "target": name, "executions": n,
                    "distinct": distinct, "seconds": secs, "seed": seed})
                )
                .as_bytes(),
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Seeds: every sample, valid and invalid.

fn samples() -> Vec<String> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut out = Vec::new();
    for dir in [root.clone(), root.join("invalid")] {
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .collect();
        files.sort();
        for f in files {
            out.push(std::fs::read_to_string(f).unwrap());
        }
    }
    assert!(out.len() > 20, "the samples are the seeds");
    out
}

/// Tokens that reach YAML's and the validator's corners.
const TOKENS: &[&str] = &[
    "",
    " ",
    "\n",
    "\t",
    ":",
    ": ",
    "- ",
    "-",
    "#",
    "{",
    "}",
    "[",
    "]",
    ",",
    "'",
    "\"",
    "&a ",
    "*a",
    "<<: *a",
    "!!binary ",
    "!!str ",
    "!!int ",
    "? ",
    "|",
    ">",
    "---\n",
    "...\n",
    "~",
    "null",
    "true",
    "false",
    "0",
    "-1",
    "256",
    "65536",
    "4294967296",
    "18446744073709551616",
    "-9223372036854775809",
    "0x",
    "0xff",
    "1e309",
    ".nan",
    ".inf",
    "1.5",
    "25%",
    "0%",
    "101%",
    "%",
    "\u{0}",
    "\u{feff}",
    "é",
    "\u{202e}",
    "../",
    "/..",
    "/etc/shadow",
    "a/../b",
    "struct ",
    "struct task_struct",
    "struct x.y",
    "enum e.V",
    ">=",
    ">=5.4",
    ", <6.0",
    "=",
    "!=",
    "xdp",
    "tracing",
    "ringbuf",
    "bpf_",
    "bpf_ringbuf_output",
    "builtin",
    "configMap",
    "path",
    "sha256",
    "variants",
    "programs",
    "attach",
    "dispatch",
    "slots",
    "config",
    "requires",
    "rollout",
    "fallback",
    "nodeSelector",
    "matchExpressions",
    "interfaces",
    "kernel",
    "handlerBytecode",
    "dispatchMechanism",
    "key",
    "handler",
    "value",
    "type",
    "u8",
    "u64",
    "i32",
    "bool",
];

#[derive(Clone, Debug)]
enum TextEdit {
    Insert(usize, String),
    Delete(usize, usize),
    Duplicate(usize, usize),
    ReplaceLine(usize, String),
    Indent(usize, i8),
}

fn text_edit() -> impl Strategy<Value = TextEdit> {
    let token = prop_oneof![
        4 => proptest::sample::select(TOKENS).prop_map(String::from),
        1 => "\\PC{0,12}",
        1 => "[ -~\\n]{0,24}",
    ];
    prop_oneof![
        3 => (any::<usize>(), token.clone()).prop_map(|(at, t)| TextEdit::Insert(at, t)),
        2 => (any::<usize>(), 0usize..40).prop_map(|(at, n)| TextEdit::Delete(at, n)),
        1 => (any::<usize>(), 0usize..200).prop_map(|(at, n)| TextEdit::Duplicate(at, n)),
        2 => (any::<usize>(), token).prop_map(|(l, t)| TextEdit::ReplaceLine(l, t)),
        1 => (any::<usize>(), -4i8..4).prop_map(|(l, d)| TextEdit::Indent(l, d)),
    ]
}

fn floor(s: &str, at: usize) -> usize {
    let mut at = at.min(s.len());
    while !s.is_char_boundary(at) {
        at -= 1;
    }
    at
}

fn apply_edit(text: &mut String, edit: &TextEdit) {
    let len = text.len().max(1);
    match edit {
        TextEdit::Insert(at, t) => {
            let at = floor(text, at % (len + 1));
            text.insert_str(at, t);
        }
        TextEdit::Delete(at, n) => {
            let a = floor(text, at % len);
            let b = floor(text, a + n);
            text.replace_range(a..b, "");
        }
        TextEdit::Duplicate(at, n) => {
            let a = floor(text, at % len);
            let b = floor(text, a + n);
            let piece = text[a..b].to_string();
            text.insert_str(b, &piece);
        }
        TextEdit::ReplaceLine(l, t) => {
            let mut lines: Vec<String> = text.lines().map(String::from).collect();
            if lines.is_empty() {
                return;
            }
            let i = l % lines.len();
            // Keep the key, replace the value: reaches the validator more often.
            lines[i] = match lines[i].split_once(": ") {
                Some((k, _)) => format!("{k}: {t}"),
                None => t.clone(),
            };
            *text = lines.join("\n");
        }
        TextEdit::Indent(l, d) => {
            let mut lines: Vec<String> = text.lines().map(String::from).collect();
            if lines.is_empty() {
                return;
            }
            let i = l % lines.len();
            let line = &lines[i];
            lines[i] = if *d >= 0 {
                format!("{}{line}", " ".repeat(*d as usize))
            } else {
                let strip = ((-*d) as usize).min(line.len() - line.trim_start_matches(' ').len());
                line[strip..].to_string()
            };
            *text = lines.join("\n");
        }
    }
}

fn report_shapes(reports: &[bpfpoly_crds::document::DocumentReport]) -> Vec<String> {
    let mut shapes: Vec<String> = reports
        .iter()
        .flat_map(|r| {
            r.errors
                .iter()
                .map(|e| format!("{} | {}", shape(&e.path), shape(&e.message)))
        })
        .collect();
    if reports.iter().any(|r| r.errors.is_empty()) {
        shapes.push("valid".into());
    }
    shapes
}

/// The documents of a stream with their indexes, up to the first syntax error (after
/// one, serde_yaml's document iterator never ends).
fn documents(text: &str) -> Vec<(usize, Value)> {
    let mut out = Vec::new();
    for (i, d) in serde_yaml::Deserializer::from_str(text).enumerate() {
        match <Value as serde::Deserialize>::deserialize(d) {
            Ok(Value::Null) => {}
            Ok(v) => out.push((i, v)),
            Err(_) => break,
        }
    }
    out
}

#[test]
fn fuzz_check_stream_on_mutated_samples() {
    let seeds = samples();
    let n = seeds.len();
    let strategy = (0..n, proptest::collection::vec(text_edit(), 1..8));
    fuzz("check_stream(mutated samples)", strategy, |(i, edits)| {
        let mut text = seeds[i].clone();
        for e in &edits {
            apply_edit(&mut text, e);
        }
        let reports = check_stream(&text);
        // Whatever a document is, a report that calls it valid means it deserializes.
        let docs = documents(&text);
        for r in reports.iter().filter(|r| r.errors.is_empty()) {
            let doc = docs
                .iter()
                .find(|(i, _)| *i == r.index)
                .map(|(_, d)| d.clone());
            prop_assert!(
                doc.is_some_and(
                    |d| serde_json::from_value::<bpfpoly_crds::BpfPolyProgram>(d).is_ok()
                ),
                "document {} reported valid but does not deserialize",
                r.index
            );
        }
        Ok(report_shapes(&reports))
    });
}

// ---------------------------------------------------------------------------------------
// Structural mutations of the JSON tree.

#[derive(Clone, Debug)]
enum TreeEdit {
    Replace(Vec<u16>, Value),
    Remove(Vec<u16>),
    AddKey(Vec<u16>, String, Value),
    Grow(Vec<u16>, u8),
    Graft(Vec<u16>, Vec<u16>),
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        prop_oneof![
            Just(0.5f64),
            Just(-1.0),
            Just(1e300),
            Just(f64::MIN_POSITIVE)
        ]
        .prop_map(Value::from),
        proptest::sample::select(TOKENS).prop_map(Value::from),
        "\\PC{0,20}".prop_map(Value::from),
        "[a-z0-9-]{0,70}".prop_map(Value::from),
        "[0-9a-f]{64}".prop_map(Value::from),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map(
                prop_oneof![
                    proptest::sample::select(TOKENS).prop_map(String::from),
                    "[a-zA-Z]{1,10}"
                ],
                inner,
                0..4
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn path() -> impl Strategy<Value = Vec<u16>> {
    proptest::collection::vec(any::<u16>(), 0..7)
}

fn tree_edit() -> impl Strategy<Value = TreeEdit> {
    prop_oneof![
        4 => (path(), json_value()).prop_map(|(p, v)| TreeEdit::Replace(p, v)),
        2 => path().prop_map(TreeEdit::Remove),
        1 => (path(), prop_oneof![proptest::sample::select(TOKENS).prop_map(String::from), "[a-zA-Z]{1,12}"], leaf())
            .prop_map(|(p, k, v)| TreeEdit::AddKey(p, k, v)),
        1 => (path(), 1u8..40).prop_map(|(p, n)| TreeEdit::Grow(p, n)),
        1 => (path(), path()).prop_map(|(a, b)| TreeEdit::Graft(a, b)),
    ]
}

/// Follows `path` (each step picks a child modulo the number of children) as far as it
/// goes; returns the node reached.
fn walk<'a>(mut v: &'a mut Value, path: &[u16]) -> &'a mut Value {
    for &step in path {
        let len = match v {
            Value::Object(m) => m.len(),
            Value::Array(a) => a.len(),
            _ => 0,
        };
        if len == 0 {
            break;
        }
        let i = step as usize % len;
        v = match v {
            Value::Object(m) => m.values_mut().nth(i).unwrap(),
            Value::Array(a) => &mut a[i],
            _ => unreachable!(),
        };
    }
    v
}

fn apply_tree_edit(doc: &mut Value, edit: &TreeEdit) {
    match edit {
        TreeEdit::Replace(p, v) => *walk(doc, p) = v.clone(),
        TreeEdit::Remove(p) => {
            if let Some((last, parent)) = p.split_last() {
                match walk(doc, parent) {
                    Value::Object(m) if !m.is_empty() => {
                        let k = m.keys().nth(*last as usize % m.len()).unwrap().clone();
                        m.remove(&k);
                    }
                    Value::Array(a) if !a.is_empty() => {
                        let i = *last as usize % a.len();
                        a.remove(i);
                    }
                    _ => {}
                }
            }
        }
        TreeEdit::AddKey(p, k, v) => {
            if let Value::Object(m) = walk(doc, p) {
                m.insert(k.clone(), v.clone());
            }
        }
        TreeEdit::Grow(p, n) => {
            if let Value::Array(a) = walk(doc, p) {
                if let Some(first) = a.first().cloned() {
                    for _ in 0..*n {
                        a.push(first.clone());
                    }
                }
            }
        }
        TreeEdit::Graft(from, to) => {
            let piece = walk(doc, from).clone();
            *walk(doc, to) = piece;
        }
    }
}

#[test]
fn fuzz_check_value_on_structural_mutations() {
    let seeds: Vec<Value> = samples()
        .iter()
        .flat_map(|text| documents(text).into_iter().map(|(_, v)| v))
        .filter(|v: &Value| v.is_object())
        .collect();
    let n = seeds.len();
    let strategy = (0..n, proptest::collection::vec(tree_edit(), 1..6));
    fuzz(
        "check_value(structural mutations)",
        strategy,
        |(i, edits)| {
            let mut doc = seeds[i].clone();
            for e in &edits {
                apply_tree_edit(&mut doc, e);
            }
            let report = check_value(0, doc.clone());
            // The text path agrees with the tree path: the same document written as YAML
            // gets the same errors.
            if let Ok(text) = serde_yaml::to_string(&doc) {
                let from_text = check_stream(&text);
                if let Some(r) = from_text.first() {
                    let yaml_ok = !r
                        .errors
                        .iter()
                        .any(|e| e.message.starts_with("not valid YAML"));
                    if yaml_ok && doc.is_object() {
                        let a: Vec<String> =
                            report.errors.iter().map(ToString::to_string).collect();
                        let b: Vec<String> = r.errors.iter().map(ToString::to_string).collect();
                        prop_assert_eq!(a, b, "text and tree validation disagree on {}", text);
                    }
                }
            }
            Ok(report_shapes(&[report]))
        },
    );
}

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
