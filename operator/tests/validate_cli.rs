//! `bpfpoly-operator validate` on the committed samples and the invalid corpus.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

fn validate(files: &[PathBuf]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_bpfpoly-operator"))
        .arg("validate")
        .args(files)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn samples_are_valid() {
    let files = yaml_files(&repo().join("crds/examples"));
    assert!(
        files.len() >= 4,
        "expected the four samples, found {files:?}"
    );
    let (code, stdout, stderr) = validate(&files);
    assert_eq!(code, 0, "samples must validate:\n{stderr}");
    assert_eq!(stdout.matches(": valid").count(), files.len(), "{stdout}");
}

#[test]
fn every_invalid_program_is_rejected_naming_its_field() {
    let files = yaml_files(&repo().join("crds/examples/invalid"));
    assert!(
        files.len() >= 15,
        "need at least 15 invalid programs, found {}",
        files.len()
    );
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let expect = text
            .lines()
            .find_map(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} has no `# expect: PATH` line", f.display()));
        let (code, _, stderr) = validate(std::slice::from_ref(&f));
        assert_eq!(code, 1, "{} must exit 1; stderr:\n{stderr}", f.display());
        assert!(
            stderr.contains(&format!("): {expect}: ")),
            "{} must name {expect}; stderr:\n{stderr}",
            f.display()
        );
    }
}

#[test]
fn all_errors_of_a_document_are_reported_at_once() {
    let doc = r#"
apiVersion: bpfpoly.io/v1alpha1
kind: BpfPolyProgram
metadata: {name: many-problems}
spec:
  variants:
  - name: Bad_Name
    bytecode: {}
    programs: [{name: on_exec}]
    requires: {kernel: "5", programTypes: [nope]}
  config:
  - {name: x, type: u8, value: "300", fallback: "-1", requires: {mapTypes: [ringbuf]}}
"#;
    let dir = std::env::temp_dir().join(format!("bpfpoly-validate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("many.yaml");
    std::fs::write(&f, doc).unwrap();
    let (code, _, stderr) = validate(std::slice::from_ref(&f));
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(code, 1);
    for path in [
        "spec.variants[0].name",
        "spec.variants[0].bytecode",
        "spec.variants[0].programs[0].attach",
        "spec.variants[0].requires.kernel",
        "spec.variants[0].requires.programTypes[0]",
        "spec.config[0].value",
        "spec.config[0].fallback",
    ] {
        assert!(
            stderr.contains(&format!("): {path}: ")),
            "missing {path}:\n{stderr}"
        );
    }
}

#[test]
fn missing_file_and_non_yaml_fail_clearly() {
    let (code, _, stderr) = validate(&[PathBuf::from("/nonexistent/bpfpoly.yaml")]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("/nonexistent/bpfpoly.yaml: cannot read"),
        "{stderr}"
    );
}

#[test]
fn a_fallback_without_requires_is_a_warning_not_an_error() {
    let doc = r#"
apiVersion: bpfpoly.io/v1alpha1
kind: BpfPolyProgram
metadata: {name: dead-fallback}
spec:
  variants:
  - name: tp
    bytecode: {builtin: exec-tracer-tracepoint}
    programs: [{name: on_exec, attach: {tracepoint: {category: sched, name: sched_process_exec}}}]
  config:
  - {name: sample_every, type: u32, value: "1", fallback: "1"}
  - {name: bad, type: u8, value: "1", fallback: "nope"}
"#;
    let dir = std::env::temp_dir().join(format!("bpfpoly-validate-w-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let warn_only = dir.join("warn.yaml");
    // Only the first field: valid, with a warning.
    std::fs::write(
        &warn_only,
        doc.replace(
            "  - {name: bad, type: u8, value: \"1\", fallback: \"nope\"}\n",
            "",
        ),
    )
    .unwrap();
    let (code, stdout, stderr) = validate(std::slice::from_ref(&warn_only));
    assert_eq!(
        code, 0,
        "a dead fallback must not fail validation:\n{stderr}"
    );
    assert!(
        stdout.contains("BpfPolyProgram/dead-fallback (document 0): valid"),
        "{stdout}"
    );
    assert!(
        stderr.contains("warning: spec.config[0].fallback: is never used"),
        "{stderr}"
    );
    // A fallback that does not parse as its type stays an error.
    let both = dir.join("both.yaml");
    std::fs::write(&both, doc).unwrap();
    let (code, _, stderr) = validate(std::slice::from_ref(&both));
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("): spec.config[1].fallback: "), "{stderr}");
    assert!(
        !stderr.contains("): spec.config[1].fallback: is never used"),
        "{stderr}"
    );
}
