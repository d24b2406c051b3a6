#![allow(clippy::unwrap_used)]
//! Status messages of bytecode that cannot be fetched, through the real loader: the
//! message names the source and the cause, and says "bytecode" once (the loader
//! writes `bytecode: `, the fetch error names the source).

mod loader_support;

use bpfpoly_agent::fetch::{describe, fetch_path, FetchError, Prefetched};
use bpfpoly_crds::{program::Bytecode, state::Phase};
use loader_support::{assignment, classifier_config, classifier_variant, unique_name, Root};
use serde_json::json;

#[test]
fn fetch_failures_say_bytecode_once() {
    require_privileges!();
    let root = Root::new();
    let scratch =
        std::env::temp_dir().join(format!("bpfpoly-fetch-messages-{}", std::process::id()));
    let allowed = scratch.join("allowed");
    std::fs::create_dir_all(&allowed).unwrap();
    // A file outside the allowed directory (canonical: the message shows where it resolves).
    let secret = scratch.canonicalize().unwrap().join("secret.o");
    std::fs::write(&secret, b"x").unwrap();
    let secret = secret.display().to_string();
    let mut loader = root.loader();

    let sha = "0".repeat(64);
    let cm =
        json!({"configMap": {"namespace": "ns", "name": "progs", "key": "prog.o"}, "sha256": sha});
    let missing_builtin = json!({"builtin": "no-such-object"});
    let outside = json!({"path": secret, "sha256": sha});
    let relative = json!({"path": "relative.o", "sha256": sha});

    // What the agent fetched before the load: the ConfigMap was not found.
    let mut prefetched = Prefetched::default();
    let cm_source: Bytecode = serde_json::from_value(cm.clone()).unwrap();
    prefetched.insert(
        &cm_source,
        Err(FetchError::Unavailable {
            what: describe(&cm_source),
            reason: "ConfigMap not found".into(),
        }),
    );
    let dirs = vec![allowed.clone()];
    let fetch = |b: &Bytecode| -> Result<Vec<u8>, FetchError> {
        match &b.path {
            Some(p) => fetch_path(p, b.sha256.as_deref(), &dirs, 1 << 20),
            None => prefetched.get(b),
        }
    };

    let cases: [(serde_json::Value, &str); 4] = [
        (cm, "configMap ns/progs key prog.o: ConfigMap not found"),
        (
            missing_builtin,
            "builtin \"no-such-object\": not fetched before the load",
        ),
        (
            outside,
            &format!("path {secret:?} resolves to {secret}, outside the allowed directories"),
        ),
        (relative, "path \"relative.o\" is not absolute"),
    ];
    for (bytecode, cause) in cases {
        let mut v = classifier_variant("xdp", "packet-classifier-xdp", "lo", None);
        v["bytecode"] = bytecode;
        let a = assignment(
            &unique_name("fetch-msg"),
            1,
            vec![v],
            classifier_config(true),
            None,
        );
        let s = loader.apply(&a, &fetch).status;
        assert_eq!(s.phase, Phase::Failed, "{}", s.message);
        assert!(
            s.message.contains(&format!("bytecode: {cause}")),
            "{cause:?} not in {:?}",
            s.message
        );
        assert_eq!(s.message.matches("bytecode").count(), 1, "{:?}", s.message);
    }
    std::fs::remove_dir_all(&scratch).unwrap();
}
