//! The loader's handlers and dispatch mechanisms on the real kernel: a rejected handler
//! leaves its slot empty (static dispatch masks it off and reloads), auto dispatch with
//! freplace handlers falls back to tail calls, and config that does not match the object
//! fails before anything loads.
//!
//! Needs root. `BPFPOLY_SKIP_PRIVILEGED=1` skips every test with a message.

#![allow(clippy::unwrap_used)]

mod loader_support;

use std::fs;

use bpfpoly_agent::loader::DEFAULT_SLOT;
use bpfpoly_crds::state::{FallbackStage, Phase};
use loader_support::{
    assignment, classifier_config, classifier_dispatch, classifier_variant, fetch_builtin, frames,
    unique_name, xdp_prog_ids, Root, Veth,
};
use loader_support::{count, test_run, wait_count};
use serde_json::json;

#[test]
fn a_rejected_handler_leaves_its_slot_empty_and_udp_takes_the_default_path() {
    require_privileges!();
    let root = Root::new();
    let veth = Veth::new();
    let mut loader = root.loader();
    let name = unique_name("badhandler");
    let a = assignment(
        &name,
        1,
        vec![classifier_variant(
            "badhandler",
            "fallback-fixtures-badhandler",
            &veth.a,
            Some("tailCall"),
        )],
        classifier_config(true),
        Some(classifier_dispatch("auto")),
    );
    let s = loader.apply(&a, &fetch_builtin).status;
    assert_eq!(s.phase, Phase::Degraded, "{}", s.message);
    assert_eq!(s.mechanism.as_deref(), Some("tailCall"));
    let udp = s.handlers.iter().find(|h| h.key == 17).unwrap();
    assert_eq!(udp.state, "Empty");
    assert!(
        udp.reason.as_deref().unwrap().contains("handle_udp"),
        "{udp:?}"
    );
    assert!(s
        .handlers
        .iter()
        .filter(|h| h.key != 17)
        .all(|h| h.state == "Loaded"));
    let f = &s.fallbacks[0];
    assert_eq!(
        (f.from.as_str(), f.to.as_str(), f.stage),
        ("handle_udp", "default-path", FallbackStage::Handler)
    );
    assert!(f
        .verifier_log
        .as_deref()
        .unwrap()
        .contains("invalid access to packet"));
    assert_eq!(s.program_ids.len(), 3, "classify, handle_tcp, handle_icmp");

    let default_before = count(&loader, &name, DEFAULT_SLOT);
    veth.send_udp(4);
    let default_after = wait_count(&loader, &name, DEFAULT_SLOT, default_before + 4);
    assert!(
        default_after >= default_before + 4,
        "{default_before} -> {default_after}"
    );
    assert_eq!(count(&loader, &name, 17), 0);
    let pin = loader.running().next().unwrap().1.program_pin("classify");
    let tcp_before = count(&loader, &name, 6);
    test_run(&pin, &frames::ipv4(frames::IPPROTO_TCP));
    assert_eq!(count(&loader, &name, 6), tcp_before + 1);

    // onHandlerReject: RejectVariant rejects the whole variant instead.
    let mut strict = a.clone();
    strict.name = unique_name("badhandler-strict");
    strict.fallback.on_handler_reject = bpfpoly_crds::program::OnHandlerReject::RejectVariant;
    let veth2 = Veth::new();
    strict.candidates[0].programs[0]
        .attach
        .as_mut()
        .unwrap()
        .xdp
        .as_mut()
        .unwrap()
        .interfaces = vec![veth2.a.clone()];
    let s = loader.apply(&strict, &fetch_builtin).status;
    assert_eq!(s.phase, Phase::Failed, "{}", s.message);
    assert_eq!(s.fallbacks[0].stage, FallbackStage::Handler);
    assert!(
        s.fallbacks[0].reason.contains("RejectVariant"),
        "{}",
        s.fallbacks[0].reason
    );
}

#[test]
fn static_dispatch_masks_off_a_rejected_handler_and_reloads() {
    require_privileges!();
    let root = Root::new();
    let veth = Veth::new();
    let mut loader = root.loader();
    let name = unique_name("static");
    let a = assignment(
        &name,
        1,
        vec![classifier_variant(
            "static",
            "fallback-fixtures-badhandler",
            &veth.a,
            Some("static"),
        )],
        classifier_config(true),
        Some(classifier_dispatch("auto")),
    );
    let s = loader.apply(&a, &fetch_builtin).status;
    assert_eq!(s.phase, Phase::Degraded, "{}", s.message);
    assert_eq!(s.mechanism.as_deref(), Some("static"));
    let states: Vec<(u32, &str)> = s
        .handlers
        .iter()
        .map(|h| (h.key, h.state.as_str()))
        .collect();
    assert_eq!(states, [(1, "Loaded"), (6, "Loaded"), (17, "Empty")]);
    assert_eq!(s.program_ids.len(), 1, "handlers are inlined");
    let pin = loader.running().next().unwrap().1.program_pin("classify");
    let (udp0, tcp0) = (
        count(&loader, &name, DEFAULT_SLOT),
        count(&loader, &name, 6),
    );
    test_run(&pin, &frames::ipv4(frames::IPPROTO_UDP));
    test_run(&pin, &frames::ipv4(frames::IPPROTO_TCP));
    assert!(count(&loader, &name, DEFAULT_SLOT) > udp0);
    assert_eq!(count(&loader, &name, 6), tcp0 + 1);
    assert_eq!(count(&loader, &name, 17), 0);
}

#[test]
fn auto_dispatch_with_freplace_handlers_falls_back_to_tail_calls() {
    require_privileges!();
    let root = Root::new();
    let veth = Veth::new();
    let mut loader = root.loader();
    let name = unique_name("freplace");
    let mut variant = classifier_variant("xdp-freplace", "packet-classifier-xdp", &veth.a, None);
    variant["handlerBytecode"] = json!({"builtin": "packet-classifier-freplace"});
    let a = assignment(
        &name,
        1,
        vec![variant],
        classifier_config(true),
        Some(classifier_dispatch("auto")),
    );
    let s = loader.apply(&a, &fetch_builtin).status;
    if s.mechanism.as_deref() == Some("freplace") {
        assert_eq!(
            s.phase,
            Phase::Loaded,
            "this kernel runs freplace: {}",
            s.message
        );
        return;
    }
    assert_eq!(s.phase, Phase::Degraded, "{}", s.message);
    assert_eq!(s.mechanism.as_deref(), Some("tailCall"));
    assert_eq!(s.variant.as_deref(), Some("xdp-freplace"));
    let f = &s.fallbacks[0];
    assert_eq!(
        (f.from.as_str(), f.to.as_str(), f.stage),
        (
            "xdp-freplace/freplace",
            "xdp-freplace/tailCall",
            FallbackStage::Handler
        )
    );
    assert!(f.reason.contains("bpfpoly_slot_"), "{}", f.reason);
    assert!(
        s.handlers.iter().all(|h| h.state == "Loaded"),
        "{:?}",
        s.handlers
    );
    // Nothing of the freplace attempt is left in the pin directory.
    let dir = &loader.running().next().unwrap().1.pin_dir;
    let leftovers: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("freplace"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // An explicit freplace variant that cannot load is a variant failure.
    let mut explicit = a.clone();
    explicit.name = unique_name("freplace-explicit");
    explicit.candidates[0].dispatch_mechanism =
        Some(bpfpoly_crds::program::DispatchMechanism::Freplace);
    let veth2 = Veth::new();
    explicit.candidates[0].programs[0]
        .attach
        .as_mut()
        .unwrap()
        .xdp
        .as_mut()
        .unwrap()
        .interfaces = vec![veth2.a.clone()];
    let s = loader.apply(&explicit, &fetch_builtin).status;
    assert_eq!(s.phase, Phase::Failed, "{}", s.message);
    assert!(xdp_prog_ids(&veth2.a).is_empty());
}

#[test]
fn config_that_does_not_match_the_object_fails_before_loading() {
    require_privileges!();
    let root = Root::new();
    let veth = Veth::new();
    let mut loader = root.loader();
    let cases = [
        (
            json!([{"name": "no_such_global", "type": "bool", "value": "true"}]),
            vec!["\"no_such_global\" not found", "count_bytes"],
        ),
        (
            json!([{"name": "count_bytes", "type": "u32", "value": "1"}]),
            vec!["\"count_bytes\" is declared u32", "has bool"],
        ),
        (
            json!([{"name": "vlan_aware", "type": "bool", "value": "maybe"}]),
            vec!["config \"vlan_aware\"", "not a bool"],
        ),
    ];
    for (config, expected) in cases {
        let name = unique_name("config");
        let a = assignment(
            &name,
            1,
            vec![classifier_variant(
                "xdp",
                "packet-classifier-xdp",
                &veth.a,
                None,
            )],
            config,
            Some(classifier_dispatch("tailCall")),
        );
        let s = loader.apply(&a, &fetch_builtin).status;
        assert_eq!(s.phase, Phase::Failed, "{}", s.message);
        for fragment in expected {
            assert!(
                s.message.contains(fragment),
                "{fragment:?} in {}",
                s.message
            );
        }
        assert!(s.program_ids.is_empty());
        assert!(!root.0.join(&name).exists(), "nothing pinned");
        assert!(xdp_prog_ids(&veth.a).is_empty());
    }
    // A program whose section does not fit its attachment.
    let name = unique_name("section");
    let mut variant =
        classifier_variant("tc-on-xdp-object", "packet-classifier-xdp", &veth.a, None);
    variant["programs"][0]["attach"] =
        json!({"tc": {"interfaces": [veth.a], "direction": "ingress"}});
    let a = assignment(&name, 1, vec![variant], classifier_config(true), None);
    let s = loader.apply(&a, &fetch_builtin).status;
    assert_eq!(s.phase, Phase::Failed);
    assert!(
        s.message
            .contains("attaches as tc and needs a classifier section"),
        "{}",
        s.message
    );
    // A missing interface is an attach error naming it.
    let name = unique_name("noif");
    let a = assignment(
        &name,
        1,
        vec![classifier_variant(
            "xdp",
            "packet-classifier-xdp",
            "bpnosuchif0",
            None,
        )],
        classifier_config(true),
        None,
    );
    let s = loader.apply(&a, &fetch_builtin).status;
    assert_eq!(s.phase, Phase::Failed);
    assert_eq!(s.fallbacks[0].stage, FallbackStage::Attach);
    assert!(
        s.message.contains("interface \"bpnosuchif0\" not found"),
        "{}",
        s.message
    );
    assert!(!root.0.join(&name).exists());
}
