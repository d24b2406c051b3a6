//! The loader's lifecycle on the real kernel: hostile bytecode fails cleanly with the
//! running version kept, XDP and TCX updates are make-before-break, a new loader (or one
//! after a SIGKILL) adopts the pins without detaching, and removal leaves nothing behind.
//!
//! Needs root. `BPFPOLY_SKIP_PRIVILEGED=1` skips every test with a message.

#![allow(clippy::unwrap_used)]

mod loader_support;

use std::{fs, path::Path, time::Duration};

use aya::programs::Xdp;
use bpfpoly_agent::loader::{assignment_digest, Loader, LoaderConfig, Outcome};
use bpfpoly_crds::state::Phase;
use loader_support::{
    assignment, classifier_config, classifier_dispatch, classifier_variant, eventually,
    fetch_builtin, fetch_with, link_exists, prog_exists, tc_prog_ids, unique_name, xdp_prog_ids,
    Root, Veth,
};
use loader_support::{count, wait_count};
use serde_json::json;

/// Writes the hostile files (and a good one) into `dir` and one outside it; returns each
/// case as (path, the sha256 it is given with, what the status message must say).
fn hostile_files(
    dir: &Path,
    outside: &Path,
    classifier: &[u8],
) -> Vec<(String, String, &'static str)> {
    fs::create_dir_all(dir).unwrap();
    fs::create_dir_all(outside).unwrap();
    let sha = |b: &[u8]| bpfpoly_agent::fetch::sha256_hex(b);
    fs::write(dir.join("zero.o"), b"").unwrap();
    fs::write(dir.join("truncated.o"), &classifier[..200]).unwrap();
    fs::copy("/bin/true", dir.join("true.o")).unwrap();
    fs::write(dir.join("good.o"), classifier).unwrap();
    fs::write(outside.join("secret.o"), classifier).unwrap();
    std::os::unix::fs::symlink(outside.join("secret.o"), dir.join("escape.o")).unwrap();
    let big = fs::File::create(dir.join("big.o")).unwrap();
    big.set_len(2 << 20).unwrap();
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    fs::write(dir.join("garbage.o"), &garbage).unwrap();

    let p = |f: &str| dir.join(f).display().to_string();
    let true_bytes = fs::read("/bin/true").unwrap();
    vec![
        (p("zero.o"), sha(b""), "empty"),
        (p("truncated.o"), sha(&classifier[..200]), "ELF"),
        (p("true.o"), sha(&true_bytes), "not an eBPF object"),
        (p("garbage.o"), sha(&garbage), "not an ELF"),
        (p("good.o"), sha(b"something else"), "sha256 mismatch"),
        (
            "/bin/true".into(),
            sha(&true_bytes),
            "outside the allowed directories",
        ),
        (
            p("escape.o"),
            sha(classifier),
            "outside the allowed directories",
        ),
        (
            format!(
                "{}/../{}/secret.o",
                dir.display(),
                outside.file_name().unwrap().to_string_lossy()
            ),
            sha(classifier),
            "`..`",
        ),
        (p("big.o"), sha(b""), "over the limit"),
        (p("missing.o"), sha(b""), "No such file"),
    ]
}

#[test]
fn hostile_bytecode_fails_cleanly_and_the_running_version_keeps_running() {
    require_privileges!();
    let root = Root::new();
    let veth = Veth::new();
    let dir = std::env::temp_dir().join(unique_name(&format!(
        "bpfpoly-bytecode-{}",
        std::process::id()
    )));
    let outside = std::env::temp_dir().join(unique_name(&format!(
        "bpfpoly-outside-{}",
        std::process::id()
    )));
    let classifier = bpfpoly_agent::builtin::builtin("packet-classifier-xdp").unwrap();
    let sha = |b: &[u8]| bpfpoly_agent::fetch::sha256_hex(b);
    let cases = hostile_files(&dir, &outside, classifier);
    let max = 1 << 20;
    let fetch = fetch_with(vec![dir.clone()], max);
    let mut loader = Loader::new(LoaderConfig {
        allowed_dirs: vec![dir.clone()],
        max_object_bytes: max,
        ..root.config()
    })
    .unwrap();
    let p = |f: &str| dir.join(f).display().to_string();
    let with_path = |name: &str, generation: i64, path: &str, sha256: &str| {
        let mut v = classifier_variant("xdp", "packet-classifier-xdp", &veth.a, None);
        v["bytecode"] = json!({"path": path, "sha256": sha256});
        assignment(
            name,
            generation,
            vec![v],
            classifier_config(true),
            Some(classifier_dispatch("tailCall")),
        )
    };
    for (path, digest, expected) in &cases {
        let name = unique_name("hostile");
        let s = loader
            .apply(&with_path(&name, 1, path, digest), &fetch)
            .status;
        assert_eq!(s.phase, Phase::Failed, "{path}: {}", s.message);
        assert!(
            s.message.contains(expected),
            "{path}: {expected:?} in {}",
            s.message
        );
        assert!(!root.0.join(&name).exists());
    }
    assert!(xdp_prog_ids(&veth.a).is_empty());

    // The good file loads; a hostile update keeps it running.
    let name = unique_name("keep");
    let good = loader.apply(&with_path(&name, 1, &p("good.o"), &sha(classifier)), &fetch);
    assert_eq!(good.status.phase, Phase::Loaded, "{}", good.status.message);
    let running_ids = xdp_prog_ids(&veth.a);
    for (generation, (path, digest, expected)) in (2..).zip(&cases) {
        let applied = loader.apply(&with_path(&name, generation, path, digest), &fetch);
        assert_eq!(applied.outcome, Outcome::KeptPrevious, "{path}");
        assert_eq!(
            applied.fallbacks.len(),
            1,
            "this attempt's only: {:?}",
            applied.fallbacks
        );
        let s = &applied.status;
        assert_eq!(s.phase, Phase::Loaded);
        assert_eq!(s.observed_generation, 1);
        assert!(
            s.message
                .contains(&format!("update to generation {generation} failed")),
            "{}",
            s.message
        );
        assert!(s.message.contains(expected), "{}", s.message);
        assert_eq!(xdp_prog_ids(&veth.a), running_ids);
    }
    assert_eq!(
        fs::read_dir(root.0.join(&name)).unwrap().count(),
        1,
        "only the running version is pinned"
    );
    let _ = fs::remove_dir_all(&dir);
    let _ = fs::remove_dir_all(&outside);
}

#[test]
fn xdp_update_is_make_before_break() {
    require_privileges!();
    let root = Root::new();
    let veth = Veth::new();
    let mut loader = root.loader();
    let name = unique_name("update");
    let gen = |generation: i64, count_bytes: bool| {
        assignment(
            &name,
            generation,
            vec![classifier_variant(
                "xdp-tailcall",
                "packet-classifier-xdp",
                &veth.a,
                None,
            )],
            classifier_config(count_bytes),
            Some(classifier_dispatch("tailCall")),
        )
    };
    let first = loader.apply(&gen(1, true), &fetch_builtin);
    assert_eq!(
        first.status.phase,
        Phase::Loaded,
        "{}",
        first.status.message
    );
    let old = loader.running().next().unwrap().1.clone();
    assert_eq!(xdp_prog_ids(&veth.a), [u64::from(old.programs["classify"])]);

    let second = loader.apply(&gen(2, false), &fetch_builtin);
    assert_eq!(second.outcome, Outcome::Updated);
    assert_eq!(
        second.status.phase,
        Phase::Loaded,
        "{}",
        second.status.message
    );
    assert_eq!(second.status.observed_generation, 2);
    let new = loader.running().next().unwrap().1.clone();
    assert_ne!(new.digest, old.digest);
    assert_ne!(new.programs["classify"], old.programs["classify"]);
    // One XDP program on the interface, the new one, through the same link.
    assert_eq!(xdp_prog_ids(&veth.a), [u64::from(new.programs["classify"])]);
    assert_eq!(
        new.links[0].link_id, old.links[0].link_id,
        "updated in place"
    );
    assert!(!old.pin_dir.exists(), "old pins removed");
    assert!(new.pin_dir.exists());
    for (handler, id) in &old.programs {
        eventually(&format!("old {handler} ({id}) unloaded"), || {
            !prog_exists(*id)
        });
    }
    // Traffic keeps flowing through the new version.
    let before = count(&loader, &name, 17);
    veth.send_udp(2);
    assert_eq!(wait_count(&loader, &name, 17, before + 2), before + 2);

    // An update that fails after switching the first interface is rolled back: the
    // link runs the running version's program again, and nothing new stays pinned.
    let mut third = gen(3, true);
    third.candidates[0].programs[0]
        .attach
        .as_mut()
        .unwrap()
        .xdp
        .as_mut()
        .unwrap()
        .interfaces
        .push("bpnosuchif1".into());
    let applied = loader.apply(&third, &fetch_builtin);
    assert_eq!(
        applied.outcome,
        Outcome::KeptPrevious,
        "{}",
        applied.status.message
    );
    assert!(
        applied.status.message.contains("bpnosuchif1"),
        "{}",
        applied.status.message
    );
    assert_eq!(xdp_prog_ids(&veth.a), [u64::from(new.programs["classify"])]);
    assert_eq!(fs::read_dir(root.0.join(&name)).unwrap().count(), 1);
    let before = count(&loader, &name, 17);
    veth.send_udp(2);
    assert_eq!(wait_count(&loader, &name, 17, before + 2), before + 2);
}

#[test]
fn tc_attaches_with_tcx_and_updates_in_place() {
    require_privileges!();
    let root = Root::new();
    let veth = Veth::new();
    let mut loader = root.loader();
    let name = unique_name("tc");
    let gen = |generation: i64, count_bytes: bool| {
        let mut v = classifier_variant("tc", "packet-classifier-tc", &veth.a, None);
        v["programs"][0]["attach"] =
            json!({"tc": {"interfaces": [veth.a], "direction": "ingress"}});
        assignment(
            &name,
            generation,
            vec![v],
            classifier_config(count_bytes),
            Some(classifier_dispatch("tailCall")),
        )
    };
    let s = loader.apply(&gen(1, true), &fetch_builtin).status;
    assert_eq!(s.phase, Phase::Loaded, "{}", s.message);
    let old = loader.running().next().unwrap().1.clone();
    assert_eq!(
        (old.links[0].kind.as_str(), old.links[0].mode.as_deref()),
        ("tc", Some("ingress"))
    );
    assert_eq!(tc_prog_ids(&veth.a), [u64::from(old.programs["classify"])]);
    let before = count(&loader, &name, 17);
    veth.send_udp(3);
    assert_eq!(wait_count(&loader, &name, 17, before + 3), before + 3);

    let applied = loader.apply(&gen(2, false), &fetch_builtin);
    assert_eq!(
        applied.outcome,
        Outcome::Updated,
        "{}",
        applied.status.message
    );
    let new = loader.running().next().unwrap().1.clone();
    assert_eq!(new.links[0].link_id, old.links[0].link_id);
    assert_eq!(tc_prog_ids(&veth.a), [u64::from(new.programs["classify"])]);
}

#[test]
fn a_new_loader_adopts_the_pins_without_detaching() {
    require_privileges!();
    let root = Root::new();
    let veth = Veth::new();
    let name = unique_name("restart");
    let a = assignment(
        &name,
        3,
        vec![classifier_variant(
            "xdp-tailcall",
            "packet-classifier-xdp",
            &veth.a,
            None,
        )],
        classifier_config(true),
        Some(classifier_dispatch("tailCall")),
    );
    let (status, info) = {
        let mut loader = root.loader();
        let applied = loader.apply(&a, &fetch_builtin);
        assert_eq!(
            applied.status.phase,
            Phase::Loaded,
            "{}",
            applied.status.message
        );
        let info = loader.running().next().unwrap().1.clone();
        (applied.status, info)
        // The loader is dropped here, as a SIGKILL'd agent would leave things.
    };
    for &id in &status.program_ids {
        assert!(prog_exists(id), "{id} survives the loader");
    }
    assert_eq!(
        xdp_prog_ids(&veth.a),
        [u64::from(info.programs["classify"])]
    );
    // Tail calls still work with the agent gone: the table is pinned.
    let udp_pin = info.map_pin("bpfpoly_dispatch");
    assert!(udp_pin.exists());
    veth.send_udp(3);

    // An interrupted attempt (no record) is cleaned up on adoption.
    let interrupted = root.0.join(&name).join("0123456789abcdef");
    fs::create_dir(&interrupted).unwrap();

    let mut loader = root.loader();
    let adopted = loader.adopt();
    assert_eq!(adopted.len(), 1);
    let found = &adopted[0];
    assert_eq!(found.name, name);
    assert_eq!(found.digest, assignment_digest(&a));
    assert!(found.consistent, "{:?}", found.note);
    assert_eq!(found.status.program_ids, status.program_ids);
    assert_eq!(found.info.programs, info.programs);
    assert!(!interrupted.exists());
    assert_eq!(
        wait_count(&loader, &name, 17, 3),
        3,
        "frames counted while no agent ran"
    );

    let applied = loader.apply(&a, &fetch_builtin);
    assert_eq!(applied.outcome, Outcome::Unchanged);
    assert_eq!(
        xdp_prog_ids(&veth.a),
        [u64::from(info.programs["classify"])],
        "attached once"
    );
    assert_eq!(fs::read_dir(root.0.join(&name)).unwrap().count(), 1);
}

fn restart_assignment(name: &str, iface: &str) -> bpfpoly_crds::state::ProgramAssignment {
    assignment(
        name,
        1,
        vec![classifier_variant(
            "xdp-tailcall",
            "packet-classifier-xdp",
            iface,
            None,
        )],
        classifier_config(true),
        Some(classifier_dispatch("tailCall")),
    )
}

/// Run by `a_sigkilled_agent_*` in a child process: applies, reports, waits to be killed.
#[test]
fn helper_process_applies_and_waits_for_sigkill() {
    let Ok(spec) = std::env::var("BPFPOLY_LOADER_HELPER") else {
        return; // only as a child of the test below
    };
    let [root, iface, name, ready]: [&str; 4] =
        spec.split('|').collect::<Vec<_>>().try_into().unwrap();
    let mut loader = Loader::new(LoaderConfig {
        bpffs_root: root.into(),
        ..LoaderConfig::default()
    })
    .unwrap();
    let s = loader
        .apply(&restart_assignment(name, iface), &fetch_builtin)
        .status;
    fs::write(ready, serde_json::to_string(&s).unwrap()).unwrap();
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[test]
fn a_sigkilled_agent_leaves_programs_running_and_a_new_one_adopts_them() {
    require_privileges!();
    let root = Root::new();
    let veth = Veth::new();
    let name = unique_name("sigkill");
    let ready = std::env::temp_dir().join(unique_name(&format!(
        "bpfpoly-ready-{}",
        std::process::id()
    )));
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "helper_process_applies_and_waits_for_sigkill",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(
            "BPFPOLY_LOADER_HELPER",
            format!(
                "{}|{}|{}|{}",
                root.0.display(),
                veth.a,
                name,
                ready.display()
            ),
        )
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    eventually("the helper applied", || {
        ready.exists() && fs::metadata(&ready).unwrap().len() > 0
    });
    let status: bpfpoly_crds::state::ProgramStatus =
        serde_json::from_str(&fs::read_to_string(&ready).unwrap()).unwrap();
    let _ = fs::remove_file(&ready);
    assert_eq!(status.phase, Phase::Loaded, "{}", status.message);
    child.kill().unwrap(); // SIGKILL: no cleanup runs
    child.wait().unwrap();

    let attached = xdp_prog_ids(&veth.a);
    assert_eq!(attached.len(), 1, "still attached after SIGKILL");
    for &id in &status.program_ids {
        assert!(prog_exists(id), "program {id} survives SIGKILL");
    }
    let mut loader = root.loader();
    let adopted = loader.adopt();
    assert_eq!(adopted.len(), 1);
    assert!(adopted[0].consistent, "{:?}", adopted[0].note);
    assert_eq!(
        adopted[0].digest,
        assignment_digest(&restart_assignment(&name, &veth.a))
    );
    assert_eq!(adopted[0].status.program_ids, status.program_ids);
    // Tail calls still dispatch: the table's pin kept its entries.
    veth.send_udp(3);
    assert_eq!(wait_count(&loader, &name, 17, 3), 3);
    let applied = loader.apply(&restart_assignment(&name, &veth.a), &fetch_builtin);
    assert_eq!(applied.outcome, Outcome::Unchanged);
    assert_eq!(xdp_prog_ids(&veth.a), attached, "attached once");
}

#[test]
fn adoption_switches_back_a_link_an_interrupted_update_left_pointing_elsewhere() {
    require_privileges!();
    let root = Root::new();
    let veth = Veth::new();
    let name = unique_name("repair");
    let info = {
        let mut loader = root.loader();
        let s = loader
            .apply(&restart_assignment(&name, &veth.a), &fetch_builtin)
            .status;
        assert_eq!(s.phase, Phase::Loaded, "{}", s.message);
        let info = loader.running().next().unwrap().1.clone();
        info
    };
    // What an agent killed in the middle of an update leaves: the pinned link already
    // switched to a program whose pins were never recorded.
    let mut other = aya::EbpfLoader::new()
        .load(bpfpoly_agent::builtin::builtin("packet-classifier-xdp").unwrap())
        .unwrap();
    let xdp: &mut Xdp = other.program_mut("classify").unwrap().try_into().unwrap();
    xdp.load().unwrap();
    let stray = xdp.info().unwrap().id();
    let link =
        aya::programs::links::PinnedLink::from_pin(info.pin_dir.join(&info.links[0].pin)).unwrap();
    let link =
        aya::programs::xdp::XdpLink::try_from(aya::programs::links::FdLink::from(link)).unwrap();
    let id = xdp.attach_to_link(link).unwrap();
    drop(xdp.take_link(id).unwrap());
    drop(other);
    assert_eq!(xdp_prog_ids(&veth.a), [u64::from(stray)]);

    let mut loader = root.loader();
    let adopted = loader.adopt();
    assert_eq!(adopted.len(), 1);
    assert!(adopted[0].consistent, "{:?}", adopted[0].note);
    assert!(
        adopted[0]
            .note
            .as_deref()
            .unwrap()
            .contains("switched back"),
        "{:?}",
        adopted[0].note
    );
    assert_eq!(
        xdp_prog_ids(&veth.a),
        [u64::from(info.programs["classify"])]
    );
    eventually("the stray program unloaded", || !prog_exists(stray));
}

#[test]
fn remove_detaches_and_unpins_everything() {
    require_privileges!();
    let root = Root::new();
    let veth = Veth::new();
    let mut loader = root.loader();
    let name = unique_name("remove");
    let a = assignment(
        &name,
        1,
        vec![classifier_variant(
            "xdp-tailcall",
            "packet-classifier-xdp",
            &veth.a,
            None,
        )],
        classifier_config(true),
        Some(classifier_dispatch("tailCall")),
    );
    let s = loader.apply(&a, &fetch_builtin).status;
    assert_eq!(s.phase, Phase::Loaded, "{}", s.message);
    let info = loader.running().next().unwrap().1.clone();
    loader.remove(&name).unwrap();
    assert!(!root.0.join(&name).exists());
    assert_eq!(loader.running().count(), 0);
    assert!(xdp_prog_ids(&veth.a).is_empty());
    for link in &info.links {
        eventually(&format!("link {} gone", link.link_id), || {
            !link_exists(link.link_id)
        });
    }
    for &id in &s.program_ids {
        eventually(&format!("program {id} unloaded"), || !prog_exists(id));
    }
    // Removing again is fine.
    loader.remove(&name).unwrap();
}

#[test]
fn cleanup_all_removes_every_program_under_the_root() {
    require_privileges!();
    let root = Root::new();
    let veth = Veth::new();
    let mut loader = root.loader();
    let mut ids = Vec::new();
    for (i, iface) in [&veth.a, &veth.b].into_iter().enumerate() {
        let a = assignment(
            &format!("cleanup-{i}"),
            1,
            vec![classifier_variant(
                "xdp",
                "packet-classifier-xdp",
                iface,
                None,
            )],
            classifier_config(true),
            Some(classifier_dispatch("tailCall")),
        );
        let s = loader.apply(&a, &fetch_builtin).status;
        assert_eq!(s.phase, Phase::Loaded, "{}", s.message);
        ids.extend(s.program_ids);
    }
    drop(loader);
    assert_eq!(Loader::cleanup_all(&root.0).unwrap(), 2);
    assert!(!root.0.exists(), "the emptied root itself is removed");
    assert_eq!(
        Loader::cleanup_all(&root.0).unwrap(),
        0,
        "a second cleanup finds nothing"
    );
    assert!(xdp_prog_ids(&veth.a).is_empty() && xdp_prog_ids(&veth.b).is_empty());
    for id in ids {
        eventually(&format!("program {id} unloaded"), || !prog_exists(id));
    }
}
