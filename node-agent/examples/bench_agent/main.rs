//! The agent on the real kernel (part 2 of `make bench`, `e2e/bench/bench.sh`), through the
//! loader API (`Loader::apply`), each figure next to an anchor measured in this run.
//! Prints one JSON document: result rows and the raw samples (milliseconds).
//!
//! - Assignment -> attached: the packet classifier (XDP, skb mode, tail calls) on a veth
//!   pair created here, updated N times with `count_bytes` alternating, so every apply is
//!   a real reload (load, fill the jump table, switch the XDP link, pin, drop the old
//!   version). Paced (the agent idle between assignments, as when they come from the
//!   API server) and back to back. Anchor: `bpftool prog loadall` of the same object
//!   plus `bpftool net attach xdpgeneric` (load and attach, no pins kept, no checks).
//! - Verifier rejection -> fallback attached: candidates `fallback-fixtures-reject`
//!   (its `classify` is rejected) then `packet-classifier-xdp`; the whole apply, and the
//!   part after the rejection (`Applied::fallback_duration`). Anchor: bpftool loading the
//!   rejected object (fails) then loading and attaching the good one.
//! - Load: a fresh apply (nothing running before) vs `bpftool prog loadall` alone.
//! - Start-up profile: `bpfpoly-agent profile` (BTF read+hash+parse, probes, in
//!   parallel) vs `bpftool feature probe` and vs `bpftool btf dump file
//!   /sys/kernel/btf/vmlinux`; whole processes, wall clock.
//!
//! Usage (root): `bench_agent --agent target/release/bpfpoly-agent [--updates N]
//! [--iterations N] [--objects DIR]`

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fixtures;
mod rows;

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use bpfpoly_agent::{
    builtin,
    loader::{Loader, LoaderConfig, Outcome},
};
use bpfpoly_crds::state::Phase;
use serde_json::{json, Value};

use crate::fixtures::{assignment, fetch, ms, sh, time_cmd, variant, xdp_prog_id, Dir, Veth};
use crate::rows::Samples;

struct Args {
    agent: PathBuf,
    updates: usize,
    iterations: usize,
    objects: PathBuf,
}

fn args() -> Args {
    let mut a = Args {
        agent: PathBuf::from("target/release/bpfpoly-agent"),
        updates: 100,
        iterations: 30,
        objects: std::env::temp_dir().join(format!("bpfpoly-bench-{}", std::process::id())),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--agent" => a.agent = value().into(),
            "--updates" => a.updates = value().parse().expect("--updates N"),
            "--iterations" => a.iterations = value().parse().expect("--iterations N"),
            "--objects" => a.objects = value().into(),
            other => panic!("unknown argument {other}"),
        }
    }
    assert!(a.updates >= 50, "--updates must be at least 50");
    a
}

/// Pause between paced operations: the agent idle between assignments, as when they
/// arrive from the API server rather than in a tight loop. (Nothing of the loader is
/// prepared ahead in the pause: each apply builds its aya loader when it runs.)
const PACE: Duration = Duration::from_millis(120);

// ---------------------------------------------------------------------------
// The measurements
// ---------------------------------------------------------------------------

struct Bench {
    args: Args,
    veth: Veth,
    root: Dir,
    pins: Dir,
    xdp_obj: PathBuf,
    reject_obj: PathBuf,
}

impl Bench {
    fn loader(&self) -> Loader {
        Loader::new(LoaderConfig {
            bpffs_root: self.root.0.clone(),
            allowed_dirs: Vec::new(),
            max_object_bytes: 16 << 20,
        })
        .expect("Loader::new")
    }

    /// `bpftool prog loadall OBJ PINS/n`; returns (ms, ok) and leaves the pins.
    fn bpftool_loadall(&self, obj: &Path, n: usize) -> (f64, bool, PathBuf) {
        let dir = self.pins.0.join(format!("l{n}"));
        let (t, ok) = time_cmd(
            "bpftool",
            &[
                "prog",
                "loadall",
                obj.to_str().unwrap(),
                dir.to_str().unwrap(),
            ],
        );
        (t, ok, dir)
    }

    fn bpftool_attach(&self, dir: &Path) -> f64 {
        let prog = dir.join("classify");
        let (t, ok) = time_cmd(
            "bpftool",
            &[
                "net",
                "attach",
                "xdpgeneric",
                "pinned",
                prog.to_str().unwrap(),
                "dev",
                &self.veth.a,
                "overwrite",
            ],
        );
        assert!(ok, "bpftool net attach xdpgeneric failed");
        t
    }

    fn bpftool_cleanup(&self, dir: &Path) {
        let _ = sh(
            "bpftool",
            &["net", "detach", "xdpgeneric", "dev", &self.veth.a],
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    /// bpftool: load + attach the classifier (the anchor of the agent's apply).
    fn anchor_load_attach(&self) -> (Vec<f64>, Vec<f64>) {
        let (mut load, mut load_attach) = (Vec::new(), Vec::new());
        for n in 0..self.args.iterations {
            let (t, ok, dir) = self.bpftool_loadall(&self.xdp_obj, n);
            assert!(ok, "bpftool prog loadall packet-classifier-xdp failed");
            let a = self.bpftool_attach(&dir);
            load.push(t);
            load_attach.push(t + a);
            self.bpftool_cleanup(&dir);
            std::thread::sleep(PACE);
        }
        (load, load_attach)
    }

    /// bpftool: the rejected object, then the good one loaded and attached.
    fn anchor_fallback(&self) -> Vec<f64> {
        let mut out = Vec::new();
        for n in 0..self.args.iterations {
            let (r, ok, rdir) = self.bpftool_loadall(&self.reject_obj, 10_000 + n);
            assert!(
                !ok,
                "bpftool loaded fallback-fixtures-reject: it must be rejected"
            );
            let _ = std::fs::remove_dir_all(&rdir);
            let (t, ok, dir) = self.bpftool_loadall(&self.xdp_obj, 20_000 + n);
            assert!(ok, "bpftool prog loadall packet-classifier-xdp failed");
            let a = self.bpftool_attach(&dir);
            out.push(r + t + a);
            self.bpftool_cleanup(&dir);
            std::thread::sleep(PACE);
        }
        out
    }

    /// Updates with count_bytes alternating; each must reload and end Loaded and attached.
    fn updates(&self, paced: bool) -> (Vec<f64>, Vec<f64>) {
        let mut loader = self.loader();
        let name = format!("bench-update-{}", if paced { "paced" } else { "tight" });
        let v = || {
            vec![variant(
                "xdp-tailcall",
                "packet-classifier-xdp",
                &self.veth.a,
            )]
        };
        let first = loader.apply(&assignment(&name, 1, v(), true), &fetch);
        assert_eq!(first.outcome, Outcome::Loaded, "{}", first.status.message);
        let (mut wall, mut reported) = (Vec::new(), Vec::new());
        let mut last_id = None;
        for i in 0..self.args.updates {
            if paced {
                std::thread::sleep(PACE);
            }
            let a = assignment(&name, 2 + i as i64, v(), i % 2 == 1);
            let t = Instant::now();
            let applied = loader.apply(&a, &fetch);
            let elapsed = t.elapsed();
            assert_eq!(
                applied.outcome,
                Outcome::Updated,
                "update {i}: {}",
                applied.status.message
            );
            assert_eq!(applied.status.phase, Phase::Loaded, "update {i}");
            wall.push(ms(elapsed));
            reported.push(ms(applied.duration));
            if i % 10 == 9 {
                // Attached, and a new program each time (outside the timing).
                let id = xdp_prog_id(&self.veth.a).expect("an XDP program on the veth");
                assert_ne!(Some(id), last_id, "update {i} did not replace the program");
                last_id = Some(id);
            }
        }
        loader.remove(&name).expect("remove");
        assert_eq!(
            xdp_prog_id(&self.veth.a),
            None,
            "XDP left on the veth after remove"
        );
        (wall, reported)
    }

    /// Fresh loads: (apply ms) with nothing running before; removed after each.
    fn fresh_loads(&self) -> Vec<f64> {
        let mut loader = self.loader();
        let mut out = Vec::new();
        for n in 0..self.args.iterations {
            std::thread::sleep(PACE);
            let name = format!("bench-load-{n}");
            let a = assignment(
                &name,
                1,
                vec![variant(
                    "xdp-tailcall",
                    "packet-classifier-xdp",
                    &self.veth.a,
                )],
                true,
            );
            let t = Instant::now();
            let applied = loader.apply(&a, &fetch);
            out.push(ms(t.elapsed()));
            assert_eq!(
                applied.outcome,
                Outcome::Loaded,
                "{}",
                applied.status.message
            );
            loader.remove(&name).expect("remove");
        }
        out
    }

    /// Verifier rejection -> fallback attached: (whole apply ms, after-rejection ms).
    fn fallbacks(&self) -> (Vec<f64>, Vec<f64>) {
        let mut loader = self.loader();
        let (mut whole, mut after) = (Vec::new(), Vec::new());
        for n in 0..self.args.iterations {
            std::thread::sleep(PACE);
            let name = format!("bench-fallback-{n}");
            let a = assignment(
                &name,
                1,
                vec![
                    variant("reject", "fallback-fixtures-reject", &self.veth.a),
                    variant("xdp-tailcall", "packet-classifier-xdp", &self.veth.a),
                ],
                true,
            );
            let t = Instant::now();
            let applied = loader.apply(&a, &fetch);
            whole.push(ms(t.elapsed()));
            let s = &applied.status;
            assert_eq!(s.phase, Phase::Degraded, "{}", s.message);
            assert_eq!(s.variant.as_deref(), Some("xdp-tailcall"));
            assert_eq!(
                s.fallbacks.first().map(|f| f.from.as_str()),
                Some("reject"),
                "a fallback from the rejected variant"
            );
            assert!(
                s.fallbacks[0]
                    .verifier_log
                    .as_deref()
                    .is_some_and(|l| !l.is_empty()),
                "the verifier log is recorded"
            );
            after.push(ms(applied
                .fallback_duration
                .expect("fallback_duration after a rejection")));
            assert!(xdp_prog_id(&self.veth.a).is_some(), "fallback attached");
            loader.remove(&name).expect("remove");
        }
        (whole, after)
    }

    /// (agent profile wall ms, its internal btf ms, its internal total ms,
    ///  bpftool feature probe ms, bpftool btf dump ms)
    fn profiles(&self) -> [Vec<f64>; 5] {
        let mut out: [Vec<f64>; 5] = Default::default();
        let agent = self.args.agent.to_str().unwrap();
        for _ in 0..self.args.iterations.min(10) {
            let t = Instant::now();
            let o = Command::new(agent)
                .args([
                    "profile",
                    "--query",
                    "type:struct linux_binprm",
                    "--query",
                    "field:struct task_struct.loginuid",
                    "--query",
                    "func:do_sys_openat2",
                    "--query",
                    "helper:tracepoint:bpf_ringbuf_output",
                ])
                .stderr(Stdio::null())
                .output()
                .unwrap_or_else(|e| panic!("running {agent}: {e}"));
            out[0].push(ms(t.elapsed()));
            assert!(o.status.success(), "bpfpoly-agent profile failed");
            let v: Value = serde_json::from_slice(&o.stdout).expect("profile JSON");
            out[1].push(v["timings"]["btfMs"].as_f64().unwrap_or(f64::NAN));
            out[2].push(v["timings"]["totalMs"].as_f64().unwrap_or(f64::NAN));
            let (p, ok) = time_cmd("bpftool", &["feature", "probe"]);
            assert!(ok, "bpftool feature probe failed");
            out[3].push(p);
            let (d, ok) = time_cmd(
                "bpftool",
                &["btf", "dump", "file", "/sys/kernel/btf/vmlinux"],
            );
            assert!(ok, "bpftool btf dump failed");
            out[4].push(d);
        }
        out
    }
}

impl Bench {
    /// The objects on disk for bpftool, a veth pair, the loader's bpffs root and a bpffs
    /// directory for bpftool's pins.
    fn set_up(args: Args) -> Self {
        std::fs::create_dir_all(&args.objects).unwrap();
        let write_obj = |name: &str| {
            let p = args.objects.join(format!("{name}.o"));
            std::fs::write(&p, builtin::builtin(name).unwrap()).unwrap();
            p
        };
        let xdp_obj = write_obj("packet-classifier-xdp");
        let reject_obj = write_obj("fallback-fixtures-reject");
        let pid = std::process::id();
        let bench = Bench {
            veth: Veth::new(),
            root: Dir(PathBuf::from(format!("/sys/fs/bpf/bpfpoly-bench-{pid}"))),
            pins: Dir(PathBuf::from(format!(
                "/sys/fs/bpf/bpfpoly-bench-bpftool-{pid}"
            ))),
            xdp_obj,
            reject_obj,
            args,
        };
        // Mounts bpffs (and tracefs) when missing, before bpftool pins anything.
        drop(bench.loader());
        std::fs::create_dir_all(&bench.pins.0).expect("a bpffs directory for bpftool's pins");
        bench
    }

    /// Every measurement, anchors first.
    fn measure_all(&self) -> Samples {
        eprintln!("[bench_agent] anchors: bpftool loadall (+ attach)");
        let (bt_load, bt_load_attach) = self.anchor_load_attach();
        let bt_fallback = self.anchor_fallback();
        eprintln!("[bench_agent] {} updates, paced", self.args.updates);
        let (upd_paced, upd_paced_reported) = self.updates(true);
        eprintln!("[bench_agent] {} updates, back to back", self.args.updates);
        let (upd_tight, _) = self.updates(false);
        eprintln!("[bench_agent] fresh loads");
        let fresh = self.fresh_loads();
        eprintln!("[bench_agent] verifier rejection -> fallback");
        let (fb_whole, fb_after) = self.fallbacks();
        eprintln!("[bench_agent] start-up profile");
        let [prof_wall, prof_btf, prof_total, bt_probe, bt_dump] = self.profiles();
        Samples {
            bt_load,
            bt_load_attach,
            bt_fallback,
            upd_paced,
            upd_paced_reported,
            upd_tight,
            fresh,
            fb_whole,
            fb_after,
            prof_wall,
            prof_btf,
            prof_total,
            bt_probe,
            bt_dump,
        }
    }
}

fn main() {
    let bench = Bench::set_up(args());
    let samples = bench.measure_all();
    let doc = json!({
        "section": "agent",
        "pace_ms": ms(PACE),
        "rows": rows::agent_rows(&samples),
        "samples_ms": samples.to_json(),
    });
    println!("{doc}");
    let _ = std::fs::remove_dir_all(&bench.args.objects);
}
