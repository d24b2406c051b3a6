//! The packet classifier on the real kernel (BPF_PROG_TEST_RUN with crafted frames): each
//! frame dispatched to its handler or the default path, exactly counted, under tail calls,
//! static dispatch and freplace; config globals that change what runs; a rejected handler
//! that leaves its slot empty while the rest still dispatch.
//!
//! Needs root (CAP_BPF/CAP_SYS_ADMIN) and BTF. `BPFPOLY_SKIP_PRIVILEGED=1` skips
//! every test with a message; without it a missing privilege is a failure.

#[path = "../src/builtin.rs"]
mod builtin;
#[macro_use]
#[path = "../../test-support/ebpf_support.rs"]
mod ebpf_support;
#[path = "../../test-support/classifier.rs"]
mod classifier;

use std::{collections::BTreeMap, fs, path::PathBuf};

use aya::{
    programs::{Extension, ProgramError, Xdp},
    EbpfLoader,
};

use classifier::*;
use ebpf_support::*;

#[test]
fn badhandler_fixture_rejects_handle_udp_and_the_rest_still_dispatches() {
    require_privileges!();
    let mut ebpf = EbpfLoader::new()
        .load(object("fallback-fixtures-badhandler"))
        .expect("parsing fallback-fixtures-badhandler");
    let mut results: BTreeMap<String, _> = load_all_programs(&mut ebpf).into_iter().collect();
    let log = verifier_log(
        results.remove("handle_udp").expect("handle_udp"),
        "fallback-fixtures-badhandler/handle_udp",
    );
    assert!(log.contains("invalid access to packet"), "{log}");
    for (program, result) in &results {
        assert!(result.is_ok(), "{program}: {result:?}");
    }

    // The agent's onHandlerReject=DefaultPath: leave slot 17 empty.
    let classifier = Classifier::from_loaded(ebpf, &[("handle_tcp", 6), ("handle_icmp", 1)]);
    classifier.run_expect(&frames::ipv4(IPPROTO_UDP), XDP_PASS);
    classifier.run_expect(&frames::ipv4(IPPROTO_TCP), XDP_PASS);
    assert_eq!(
        classifier.dispatch_counts(),
        BTreeMap::from([(6, 1), (DEFAULT_SLOT, 1)])
    );
}

#[test]
fn xdp_classifier_dispatches_each_frame_to_its_handler_or_the_default_path() {
    require_privileges!();
    assert_matrix("packet-classifier-xdp", Hook::Xdp, XDP_PASS);
}

#[test]
fn tc_classifier_dispatches_like_the_xdp_one() {
    require_privileges!();
    assert_matrix("packet-classifier-tc", Hook::Tc, TC_ACT_OK);
}

#[test]
fn frames_shorter_than_ethernet_are_refused_by_the_kernel_before_the_program_runs() {
    require_privileges!();
    let classifier = Classifier::load("packet-classifier-xdp", DEFAULT_CONFIG, ALL_SLOTS);
    for len in [0usize, 1, 13] {
        let frame = vec![0u8; len];
        let err = classifier.run(&frame).expect_err("a frame below ETH_HLEN");
        assert_eq!(errno(&err), Some(EINVAL), "{len}-byte frame: {err}");
    }
    assert_eq!(classifier.dispatch_counts(), BTreeMap::new());
    // 14 bytes is the smallest frame the kernel runs: the default path.
    classifier.run_expect(&frames::eth(frames::ETH_P_IP), XDP_PASS);
    assert_eq!(
        classifier.dispatch_counts(),
        BTreeMap::from([(DEFAULT_SLOT, 1)])
    );
}

#[test]
fn udp_takes_the_default_path_when_its_slot_is_empty() {
    require_privileges!();
    let classifier = Classifier::load(
        "packet-classifier-xdp",
        DEFAULT_CONFIG,
        &[("handle_icmp", 1), ("handle_tcp", 6)],
    );
    for frame in [
        frames::ipv4(IPPROTO_UDP),
        frames::ipv6(IPPROTO_UDP),
        frames::ipv6_hop_by_hop(IPPROTO_UDP),
    ] {
        classifier.run_expect(&frame, XDP_PASS);
    }
    classifier.run_expect(&frames::ipv4(IPPROTO_TCP), XDP_PASS);
    assert_eq!(
        classifier.dispatch_counts(),
        BTreeMap::from([(6, 1), (DEFAULT_SLOT, 3)])
    );
    assert_eq!(classifier.stats().keys().copied().collect::<Vec<_>>(), [6]);
}

#[test]
fn count_bytes_false_leaves_byte_counters_at_zero() {
    require_privileges!();
    let config = Config {
        count_bytes: false,
        ..DEFAULT_CONFIG
    };
    let classifier = Classifier::load("packet-classifier-xdp", config, ALL_SLOTS);
    let expected = run_matrix(&classifier, &matrix(), Hook::Xdp, XDP_PASS, false);
    assert_eq!(classifier.dispatch_counts(), expected.dispatch);
    let got = classifier.stats();
    assert_eq!(got, expected.stats);
    assert!(
        got.values()
            .all(|&(packets, bytes)| packets > 0 && bytes == 0),
        "{got:?}"
    );
}

#[test]
fn vlan_aware_false_sends_tagged_frames_to_the_default_path() {
    require_privileges!();
    let config = Config {
        vlan_aware: false,
        ..DEFAULT_CONFIG
    };
    let classifier = Classifier::load("packet-classifier-xdp", config, ALL_SLOTS);
    let tagged = frames::ipv4_in(
        frames::eth_vlan(&[(frames::ETH_P_8021Q, 100)], frames::ETH_P_IP),
        IPPROTO_TCP,
        0,
    );
    classifier.run_expect(&tagged, XDP_PASS);
    classifier.run_expect(&frames::ipv4(IPPROTO_TCP), XDP_PASS);
    assert_eq!(
        classifier.dispatch_counts(),
        BTreeMap::from([(6, 1), (DEFAULT_SLOT, 1)])
    );
}

#[test]
fn static_dispatch_calls_enabled_handlers_without_a_jump_table() {
    require_privileges!();
    // Bits 1 and 6 only: UDP is masked off.
    let config = Config {
        mode: 1,
        mask: (1 << 1) | (1 << 6),
        ..DEFAULT_CONFIG
    };
    let classifier = Classifier::load("packet-classifier-xdp", config, &[]);
    for frame in [
        frames::ipv4(IPPROTO_TCP),
        frames::ipv6(IPPROTO_ICMPV6),
        frames::ipv4(IPPROTO_UDP),
    ] {
        classifier.run_expect(&frame, XDP_PASS);
    }
    assert_eq!(
        classifier.dispatch_counts(),
        BTreeMap::from([(1, 1), (6, 1), (DEFAULT_SLOT, 1)])
    );
    assert_eq!(
        classifier.stats().keys().copied().collect::<Vec<_>>(),
        [1, 6]
    );
}

#[test]
fn static_dispatch_of_the_badhandler_fixture_loads_once_its_bit_is_cleared() {
    require_privileges!();
    let load_classify = |mask: u64| {
        let config = Config {
            mode: 1,
            mask,
            ..DEFAULT_CONFIG
        };
        let mut ebpf = Classifier::loader(&config)
            .load(object("fallback-fixtures-badhandler"))
            .expect("parsing fallback-fixtures-badhandler");
        let result = ebpf
            .program_mut("classify")
            .map(|p| <&mut Xdp>::try_from(p).expect("XDP").load())
            .expect("classify");
        (ebpf, result)
    };
    let (_, rejected) = load_classify((1 << 1) | (1 << 6) | (1 << 17));
    let log = verifier_log(rejected, "classify with the bad UDP handler inlined");
    assert!(log.contains("invalid access to packet"), "{log}");

    let (ebpf, accepted) = load_classify((1 << 1) | (1 << 6));
    accepted.expect("classify with bit 17 cleared");
    let classifier = Classifier::from_loaded(ebpf, &[]);
    classifier.run_expect(&frames::ipv4(IPPROTO_UDP), XDP_PASS);
    classifier.run_expect(&frames::ipv4(IPPROTO_TCP), XDP_PASS);
    assert_eq!(
        classifier.dispatch_counts(),
        BTreeMap::from([(6, 1), (DEFAULT_SLOT, 1)])
    );
}

/// freplace needs BPF trampolines. Where the kernel refuses them (EPERM with
/// an empty verifier log: see ebpf/README.md) this asserts exactly that; where
/// it allows them, the handlers replace the slots and dispatch through them.
#[test]
fn freplace_handlers_replace_the_slots_or_fail_with_eperm() {
    require_privileges!();
    let pins = PathBuf::from("/sys/fs/bpf").join(unique("bpfpoly-freplace"));
    fs::create_dir(&pins).expect("creating the pin directory");
    let _cleanup = RemoveDir(pins.clone());

    let config = Config {
        mode: 2,
        ..DEFAULT_CONFIG
    };
    let mut entry_loader = Classifier::loader(&config);
    // Handlers in the other object must count into the entry's maps.
    let stats_pin = pins.join("classifier_stats");
    let scratch_pin = pins.join("classifier_scratch");
    entry_loader
        .map_pin_path("classifier_stats", stats_pin.as_path())
        .map_pin_path("classifier_scratch", scratch_pin.as_path());
    let mut entry = entry_loader
        .load(object("packet-classifier-xdp"))
        .expect("parsing packet-classifier-xdp");
    <&mut Xdp>::try_from(entry.program_mut("classify").expect("classify"))
        .expect("XDP")
        .load()
        .expect("loading classify (freplace mode)");
    let target = entry
        .program("classify")
        .expect("classify")
        .fd()
        .expect("loaded")
        .try_clone()
        .expect("dup");

    let mut handlers = EbpfLoader::new()
        .extension("handle_tcp")
        .map_pin_path("classifier_stats", stats_pin.as_path())
        .map_pin_path("classifier_scratch", scratch_pin.as_path())
        .override_global("count_bytes", &1u8, true)
        .load(object("packet-classifier-freplace"))
        .expect("parsing packet-classifier-freplace");
    let tcp: &mut Extension = handlers
        .program_mut("handle_tcp")
        .expect("handle_tcp")
        .try_into()
        .expect("Extension");
    match tcp.load(target, "bpfpoly_slot_6") {
        Err(ProgramError::LoadError {
            io_error,
            verifier_log,
        }) if io_error.raw_os_error() == Some(EPERM) => {
            assert_eq!(
                verifier_log.to_string().trim(),
                "",
                "EPERM comes before the verifier"
            );
            eprintln!("freplace is refused by this kernel (EPERM, no verifier log)");
        }
        Err(e) => panic!("freplace load failed otherwise: {e}"),
        Ok(()) => {
            tcp.attach().expect("attaching the freplace handler");
            let classifier = Classifier::from_loaded(entry, &[]);
            classifier.run_expect(&frames::ipv4(IPPROTO_TCP), XDP_PASS);
            classifier.run_expect(&frames::ipv4(IPPROTO_UDP), XDP_PASS);
            assert_eq!(
                classifier.dispatch_counts(),
                BTreeMap::from([(6, 1), (DEFAULT_SLOT, 1)])
            );
            assert_eq!(classifier.stats().keys().copied().collect::<Vec<_>>(), [6]);
        }
    }
}
