//! Time-bounded fuzzing of the API crate's parsers (`make fuzz`, e2e/fuzz/fuzz.sh): proptest
//! strategies run in chunks until a time budget is spent, each chunk with its own seed,
//! so one test covers as many cases as the budget allows and a failure still shrinks.
//!
//! Targets: CR validation (`check_stream` on byte-level mutations of every sample and
//! invalid sample, `check_value` on structural mutations of their JSON trees). Kernel
//! release / version / requirement, BTF query and config value parsing are in
//! `fuzz_parsers.rs`; the runner is test-support/proptest_runner.rs.
//! Beyond "never panics", each target checks a property that must hold on any input
//! (round trips, agreement between the text and tree paths, ordering).
//!
//! Knobs: `BPFPOLY_FUZZ_SECS` (seconds per target, default 2: cheap enough for
//! `cargo test`), `BPFPOLY_FUZZ_SEED` (reproduce a run), `BPFPOLY_FUZZ_REPORT` (a file
//! each target appends one JSON line to: executions, distinct outcomes, seconds).
//! "Distinct outcomes" is a cheap coverage proxy: error messages with numbers and quoted
//! values masked, so each one stands for one validation branch reached.

#![allow(clippy::unwrap_used)]

use bpfpoly_crds::document::{check_stream, check_value};
use proptest::prelude::*;
use serde_json::Value;

#[path = "../../test-support/fuzz_knobs.rs"]
mod fuzz_knobs;
#[path = "../../test-support/proptest_runner.rs"]
mod proptest_runner;
use proptest_runner::{fuzz, shape};

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
