//! The loader on the real kernel: variants fall back as declared (verifier rejection,
//! attach failure, onVerifierReject Fail), the classifier runs and counts real frames on a
//! veth, and repeated apply and remove load every time. Handlers and mechanisms are in
//! `loader_handlers.rs`, updates, adoption and removal in `loader_lifecycle.rs`.
//!
//! Needs root. `BPFPOLY_SKIP_PRIVILEGED=1` skips every test with a message.

#![allow(clippy::unwrap_used)]

mod loader_support;

use std::{path::Path, time::Duration};

use bpfpoly_agent::loader::{assignment_digest, Loader, Outcome, RunningInfo, DEFAULT_SLOT};
use bpfpoly_crds::state::ProgramAssignment;
use bpfpoly_crds::state::{FallbackStage, Phase};
use loader_support::{
    assignment, classifier_config, classifier_dispatch, classifier_variant, fetch_builtin, frames,
    link_exists, prog_exists, unique_name, xdp_prog_ids, Root, Veth,
};
use loader_support::{count, test_run, wait_count, XDP_PASS};
use serde_json::json;

#[test]
fn classifier_with_tail_calls_runs_on_a_veth_and_counts_real_frames() {
    require_privileges!();
    let root = Root::new();
    let veth = Veth::new();
    let mut loader = root.loader();
    let name = unique_name("classifier");
    let a = assignment(
        &name,
        1,
        vec![classifier_variant(
            "xdp-tailcall",
            "packet-classifier-xdp",
            &veth.a,
            Some("tailCall"),
        )],
        classifier_config(true),
        Some(classifier_dispatch("auto")),
    );
    let applied = loader.apply(&a, &fetch_builtin);
    assert_eq!(applied.outcome, Outcome::Loaded, "{:?}", applied.status);
    check_loaded_with_every_handler(&applied.status);
    let info = check_pins_and_link(&loader, &root, &name, &a, &veth);
    count_real_frames(&loader, &name, &veth);
    count_test_runs(&loader, &name, &info);

    // Applying the same assignment again (a new generation, same content) loads nothing.
    let mut again = a.clone();
    again.generation = 2;
    let reapplied = loader.apply(&again, &fetch_builtin);
    assert_eq!(reapplied.outcome, Outcome::Unchanged);
    assert_eq!(reapplied.status.observed_generation, 2);
    assert_eq!(reapplied.status.program_ids, applied.status.program_ids);
}

/// Loaded as the first variant with tail calls, every handler in its slot, four programs
/// the kernel shows.
fn check_loaded_with_every_handler(s: &bpfpoly_crds::state::ProgramStatus) {
    assert_eq!(s.phase, Phase::Loaded, "{}", s.message);
    assert_eq!(s.variant.as_deref(), Some("xdp-tailcall"));
    assert_eq!(s.mechanism.as_deref(), Some("tailCall"));
    assert_eq!(s.observed_generation, 1);
    assert!(s.fallbacks.is_empty(), "{:?}", s.fallbacks);
    assert!(s.last_transition_time.is_some());
    let handlers: Vec<(u32, &str, &str)> = s
        .handlers
        .iter()
        .map(|h| (h.key, h.handler.as_str(), h.state.as_str()))
        .collect();
    assert_eq!(
        handlers,
        [
            (6, "handle_tcp", "Loaded"),
            (17, "handle_udp", "Loaded"),
            (1, "handle_icmp", "Loaded")
        ]
    );
    assert_eq!(s.program_ids.len(), 4, "{:?}", s.program_ids);
    for &id in &s.program_ids {
        assert!(prog_exists(id), "bpftool prog show id {id}");
    }
}

/// The pins under `<root>/<program>/<digest>/` and the XDP link on the veth; the running
/// program's record.
fn check_pins_and_link(
    loader: &Loader,
    root: &Root,
    name: &str,
    a: &ProgramAssignment,
    veth: &Veth,
) -> RunningInfo {
    let info = loader
        .running()
        .find(|(n, _)| *n == name)
        .unwrap()
        .1
        .clone();
    assert_eq!(info.digest, assignment_digest(a));
    let dir = root.0.join(name).join(&info.digest);
    assert_eq!(info.pin_dir, dir);
    for pin in [
        "meta",
        "jump_table",
        "bpfpoly_dispatch",
        "prog_classify",
        "prog_handle_udp",
    ] {
        assert!(dir.join(pin).exists(), "{pin} pinned in {}", dir.display());
    }
    let link = &info.links[0];
    assert_eq!(
        (link.kind.as_str(), link.target.as_str()),
        ("xdp", veth.a.as_str())
    );
    assert!(dir.join(&link.pin).exists());
    assert_eq!(
        xdp_prog_ids(&veth.a),
        [u64::from(info.programs["classify"])]
    );

    info
}

/// Real frames: UDP datagrams sent out of the peer reach the XDP hook, and the kernel's run
/// statistics count the entry (not the handlers reached by tail call).
fn count_real_frames(loader: &Loader, name: &str, veth: &Veth) {
    let stats_on = aya::sys::enable_stats(aya::sys::Stats::RunTime).unwrap();
    let before = count(loader, name, 17);
    veth.send_udp(5);
    assert_eq!(
        wait_count(loader, name, 17, before + 5),
        before + 5,
        "UDP frames on key 17"
    );
    let stats = loader.run_stats(name).unwrap();
    assert!(stats["classify"].run_count >= 5, "{stats:?}");
    // The kernel does not account runs reached by tail call.
    assert_eq!(stats["handle_udp"].run_count, 0, "{stats:?}");
    drop(stats_on);
}

/// BPF_PROG_TEST_RUN on the pinned entry: exact counts per key, and the default slot for
/// what is not IPv4.
fn count_test_runs(loader: &Loader, name: &str, info: &RunningInfo) {
    let tcp_before = count(loader, name, 6);
    for _ in 0..3 {
        assert_eq!(
            test_run(
                &info.program_pin("classify"),
                &frames::ipv4(frames::IPPROTO_TCP)
            ),
            XDP_PASS
        );
    }
    assert_eq!(count(loader, name, 6), tcp_before + 3);
    let default_before = count(loader, name, DEFAULT_SLOT);
    assert_eq!(
        test_run(&info.program_pin("classify"), &[0u8; 20]),
        XDP_PASS
    );
    assert!(count(loader, name, DEFAULT_SLOT) > default_before);
}

#[test]
fn repeated_apply_and_remove_loads_every_time() {
    require_privileges!();
    let root = Root::new();
    let veth = Veth::new();
    let mut loader = root.loader();
    let name = unique_name("timing");
    let a = assignment(
        &name,
        1,
        vec![classifier_variant(
            "xdp-tailcall",
            "packet-classifier-xdp",
            &veth.a,
            Some("tailCall"),
        )],
        classifier_config(true),
        Some(classifier_dispatch("tailCall")),
    );
    let mut durations = Vec::new();
    for _ in 0..15 {
        let applied = loader.apply(&a, &fetch_builtin);
        assert_eq!(
            applied.status.phase,
            Phase::Loaded,
            "{}",
            applied.status.message
        );
        durations.push(applied.duration);
        loader.remove(&name).unwrap();
        // Assignments arrive spaced out, not back to back.
        std::thread::sleep(Duration::from_millis(50));
    }
    durations.sort();
    let p50 = durations[durations.len() / 2];
    eprintln!(
        "apply (classifier, tail calls, 3 handlers, XDP attach, pins): p50 {:.1} ms, min {:.1} ms, max {:.1} ms",
        p50.as_secs_f64() * 1e3,
        durations[0].as_secs_f64() * 1e3,
        durations[durations.len() - 1].as_secs_f64() * 1e3
    );
    // Speed is measured by `make bench` (agent section), not asserted here.
}

#[test]
fn kprobe_variant_falls_back_to_tp_btf_at_the_attach_stage() {
    require_privileges!();
    let root = Root::new();
    let mut loader = root.loader();
    let name = unique_name("exec-tracer");
    let tracer = |variant: &str, object: &str, attach: serde_json::Value| {
        json!({
            "name": variant,
            "bytecode": {"builtin": object},
            "programs": [{"name": "on_exec", "attach": attach}]
        })
    };
    let a = assignment(
        &name,
        1,
        vec![
            tracer(
                "kprobe",
                "exec-tracer-kprobe",
                json!({"kprobe": {"function": "finalize_exec"}}),
            ),
            tracer(
                "tp-btf",
                "exec-tracer-tpbtf",
                json!({"tpBtf": {"name": "sched_process_exec"}}),
            ),
        ],
        json!([
            {"name": "use_ringbuf", "type": "bool", "value": "true"},
            {"name": "read_loginuid", "type": "bool", "value": "false", "fellBack": true,
             "reason": "test: pretend the field is missing"}
        ]),
        None,
    );
    let applied = loader.apply(&a, &fetch_builtin);
    let s = &applied.status;
    if Path::new("/sys/bus/event_source/devices/kprobe/type").exists() {
        assert_eq!(
            s.phase,
            Phase::Loaded,
            "this kernel has kprobes: {}",
            s.message
        );
        return;
    }
    assert_eq!(s.phase, Phase::Degraded, "{}", s.message);
    assert_eq!(s.variant.as_deref(), Some("tp-btf"));
    assert_eq!(s.mechanism, None);
    let f = &s.fallbacks[0];
    assert_eq!(
        (f.from.as_str(), f.to.as_str(), f.stage),
        ("kprobe", "tp-btf", FallbackStage::Attach)
    );
    assert!(f.reason.contains("kprobe"), "{}", f.reason);
    assert!(s.message.contains("kprobe -> tp-btf"), "{}", s.message);
    assert!(s.message.contains("read_loginuid=false"), "{}", s.message);
    let info = loader.running().next().unwrap().1;
    assert_eq!(info.links[0].kind, "tpBtf");
    assert!(link_exists(info.links[0].link_id));
    // Only the running variant's program is left in the kernel.
    assert_eq!(s.program_ids.len(), 1);
    eprintln!(
        "attach failure -> fallback attached: {:.1} ms",
        applied.fallback_duration.unwrap().as_secs_f64() * 1e3
    );
}

#[test]
fn a_variant_the_verifier_rejects_falls_back_with_its_log() {
    require_privileges!();
    let root = Root::new();
    let veth = Veth::new();
    let mut loader = root.loader();
    let name = unique_name("rejected");
    let a = assignment(
        &name,
        1,
        vec![
            classifier_variant("unchecked-read", "fallback-fixtures-reject", &veth.a, None),
            classifier_variant("xdp-tailcall", "packet-classifier-xdp", &veth.a, None),
        ],
        classifier_config(true),
        Some(classifier_dispatch("tailCall")),
    );
    let applied = loader.apply(&a, &fetch_builtin);
    let s = &applied.status;
    assert_eq!(s.phase, Phase::Degraded, "{}", s.message);
    assert_eq!(s.variant.as_deref(), Some("xdp-tailcall"));
    assert_eq!(s.fallbacks.len(), 1, "{:?}", s.fallbacks);
    assert_eq!(applied.fallbacks, s.fallbacks);
    let f = &s.fallbacks[0];
    assert_eq!(
        (f.from.as_str(), f.to.as_str(), f.stage),
        ("unchecked-read", "xdp-tailcall", FallbackStage::Verify)
    );
    assert!(f.reason.contains("classify"), "{}", f.reason);
    let log = f.verifier_log.as_deref().unwrap();
    assert!(!log.is_empty() && log.len() <= 4096, "{} bytes", log.len());
    assert!(log.contains("invalid access to packet"), "{log}");
    assert!(s.handlers.iter().all(|h| h.state == "Loaded"));
    assert_eq!(xdp_prog_ids(&veth.a).len(), 1);
    let fallback = applied.fallback_duration.unwrap();
    eprintln!(
        "verifier reject -> fallback attached: {:.1} ms (whole apply {:.1} ms)",
        fallback.as_secs_f64() * 1e3,
        applied.duration.as_secs_f64() * 1e3
    );
}

#[test]
fn on_verifier_reject_fail_stops_at_the_first_rejection() {
    require_privileges!();
    let root = Root::new();
    let veth = Veth::new();
    let mut loader = root.loader();
    let name = unique_name("fail-policy");
    let mut a = assignment(
        &name,
        1,
        vec![
            classifier_variant("unchecked-read", "fallback-fixtures-reject", &veth.a, None),
            classifier_variant("xdp-tailcall", "packet-classifier-xdp", &veth.a, None),
        ],
        classifier_config(true),
        None,
    );
    a.fallback.on_verifier_reject = bpfpoly_crds::program::OnVerifierReject::Fail;
    let applied = loader.apply(&a, &fetch_builtin);
    assert_eq!(applied.outcome, Outcome::Failed);
    assert_eq!(applied.status.phase, Phase::Failed);
    assert_eq!(applied.status.fallbacks.len(), 1);
    assert_eq!(applied.status.fallbacks[0].to, "none");
    assert!(
        applied.status.message.contains("unchecked-read"),
        "{}",
        applied.status.message
    );
    assert!(xdp_prog_ids(&veth.a).is_empty());
    assert!(!root.0.join(&name).exists());
}
