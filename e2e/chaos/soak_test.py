"""Soak on the real stack (`make soak`, e2e/chaos/soak.sh), as root: N apply/update/delete cycles
(BPFPOLY_SOAK_CYCLES, default 100) of a program on this file's OWN agent (node `rel-soak`,
bpffs root /sys/fs/bpf/bpfpoly-rel-soak, metrics 127.0.0.1:19466, veth `brelk0`).

Each cycle: create `rel-soak` (XDP classifier with tail calls: 4 programs, a PROG_ARRAY,
per-CPU counters, data maps, an XDP link), wait until the node runs it; change a config
value and wait for the new version (make-before-break); delete it and wait for the
finalizer (the agent reports Unloaded).

At the end nothing of it is left: every program, map and link id it ever had is gone from
the kernel, no new unpinned program or map with its names survives, nothing is attached to
brelk0, nothing is pinned under its directory; counted with bpftool before and after. The
agent's RSS at the end is within +-10% of the RSS after warm-up (BPFPOLY_SOAK_WARMUP
cycles, default 10% of N, at least 3), and at most 10% above the lowest RSS seen after
warm-up (every 10 cycles), each a median of samples taken while idle. (Before the agent
capped glibc's malloc arenas, its RSS wandered by up to +-20% over 100 cycles with no
growth in what it held.)
Numbers go to target/soak-report.json.
"""

import json
import os
import statistics
import subprocess
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import chaos_test as c  # noqa: E402  (helpers shared with the chaos scenarios)

NODE = "rel-soak"
ROOT = "/sys/fs/bpf/bpfpoly-rel-soak"
METRICS = "127.0.0.1:19466"
PROGRAM = "rel-soak"
VETHS = [("brelk0", "brelk1"), ("brelks0", "brelks1"), ("brelks2", "brelks3")]
ALIASES = ["bpfpoly0=brelks0", "bpfpoly1=brelks1", "bpfpoly2=brelks2", "bpfpoly3=brelks3"]
# Kernel object names of the classifier object (program names; maps truncated to 15 chars).
PROG_NAMES = {"classify", "handle_tcp", "handle_udp", "handle_icmp"}


def log(msg):
    print(f"[soak] {msg}", flush=True)


def kernel_objects():
    """(programs {id: (name, [pinned])}, maps {id: (name, [pinned])}, links {id: prog_id})."""
    progs = {p["id"]: (p.get("name", ""), p.get("pinned", []), p.get("map_ids", []))
             for p in c.bpftool("-f", "prog", "show") or []}
    maps = {m["id"]: (m.get("name", ""), m.get("pinned", [])) for m in c.bpftool("-f", "map", "show") or []}
    links = {link["id"]: link.get("prog_id") for link in c.bpftool("link", "show") or []}
    return progs, maps, links


def rss_median(agent, samples=5, every=0.5):
    values = []
    for _ in range(samples):
        values.append(agent.rss_kib())
        time.sleep(every)
    return statistics.median(values)


class Soak(unittest.TestCase):
    def test_cycles_leave_nothing_and_rss_stays_flat(self):
        if os.geteuid() != 0:
            raise AssertionError("the soak loads eBPF programs: run it as root")
        cycles = int(os.environ.get("BPFPOLY_SOAK_CYCLES", "100"))
        warmup = int(os.environ.get("BPFPOLY_SOAK_WARMUP", str(max(3, cycles // 10))))
        os.makedirs(os.path.join(c.RUN, "rel"), exist_ok=True)
        for a, b in VETHS:
            c.veth(a, b)
        c.apply(c.node_object(NODE, {"bpfpoly.io/rel": "soak"}))
        c.kubectl("delete", "bpp", PROGRAM, "--ignore-not-found", "--wait=true", "--timeout=60s", check=False)
        subprocess.run([c.AGENT_BIN, "cleanup", "--bpffs-root", ROOT], capture_output=True)
        agent = c.OwnAgent(node=NODE, root=ROOT, metrics=METRICS, aliases=ALIASES)
        agent.start()
        try:
            self._soak(agent, cycles, warmup)
        finally:
            c.kubectl("delete", "bpp", PROGRAM, "--ignore-not-found", "--wait=true", "--timeout=60s", check=False)
            agent.cleanup()
            c.kubectl("delete", "node", NODE, "--ignore-not-found", check=False)
            for a, _ in VETHS:
                subprocess.run(["ip", "link", "del", a], capture_output=True)

    def _soak(self, agent, cycles, warmup):
        c.wait("the agent's profile", lambda: (c.kjson("bnp", NODE) or {}).get("status", {}).get("kernel"))
        # The samples select every node: let them settle on this one first.
        c.wait("the samples on rel-soak", lambda: c.converged(NODE), timeout=120)
        before_progs, before_maps, before_links = kernel_objects()
        seen_progs, seen_maps, seen_links = set(), set(), set()
        rss_warm = rss_low = None
        durations = []
        selector = {"bpfpoly.io/rel": "soak"}
        for i in range(1, cycles + 1):
            t0 = time.time()
            c.apply(c.classifier(PROGRAM, "brelk0", True, selector))
            c.wait(f"cycle {i}: loaded", lambda: (c.program_status(PROGRAM, NODE) or {}).get("phase") == "Loaded"
                   and c.program_status(PROGRAM, NODE)["observedGeneration"] == c.generation(PROGRAM), timeout=60)
            c.set_count_bytes(PROGRAM, False)
            gen = c.generation(PROGRAM)
            s = c.wait(f"cycle {i}: updated", lambda: (lambda s: s if s and s.get("observedGeneration") == gen
                                                       and s.get("phase") == "Loaded" else None)(
                c.program_status(PROGRAM, NODE)), timeout=60)
            # What this version holds in the kernel, for the check at the end.
            progs, maps, links = kernel_objects()
            ids = set(s["programIds"])
            seen_progs |= ids
            for pid in ids:
                seen_maps |= set(progs.get(pid, ("", [], []))[2])
            seen_maps |= {mid for mid, (_, pinned) in maps.items() if any(p.startswith(f"{ROOT}/{PROGRAM}/") for p in pinned)}
            seen_links |= {lid for lid, pid in links.items() if pid in ids}
            self.assertEqual(len(c.xdp_progs("brelk0")), 1)
            c.kubectl("delete", "bpp", PROGRAM, "--wait=true", "--timeout=60s")
            c.wait(f"cycle {i}: unpinned", lambda: not os.path.exists(os.path.join(ROOT, PROGRAM)), timeout=30)
            durations.append(time.time() - t0)
            if i == warmup:
                time.sleep(2)
                rss_warm = rss_median(agent)
                rss_low = rss_warm
                log(f"warm-up done after {i} cycles: RSS {rss_warm / 1024:.1f} MiB")
            elif i > warmup and i % 10 == 0 and i != cycles:
                rss_low = min(rss_low, rss_median(agent))
            if i % 10 == 0 or i == cycles:
                log(f"cycle {i}/{cycles}: {durations[-1]:.1f} s; {len(seen_progs)} program ids so far; "
                    f"RSS {agent.rss_kib() / 1024:.1f} MiB")
            self.assertTrue(agent.alive(), agent.log_tail())
        time.sleep(2)
        rss_end = rss_median(agent)

        # Nothing of it is left. The kernel frees programs after an RCU grace period.
        def leftovers():
            progs, maps, links = kernel_objects()
            left = {
                "programs": sorted(set(progs) & seen_progs),
                "maps": sorted(set(maps) & seen_maps),
                "links": sorted(set(links) & seen_links),
                # Objects nobody pins that appeared during the soak with its names.
                "unpinned_new_programs": sorted(
                    pid for pid, (name, pinned, _) in progs.items()
                    if pid not in before_progs and name in PROG_NAMES and not pinned),
                "attached_brelk0": c.xdp_progs("brelk0"),
                "pins": sorted(os.listdir(os.path.join(ROOT, PROGRAM))) if os.path.exists(
                    os.path.join(ROOT, PROGRAM)) else [],
            }
            return left, (progs, maps, links)

        deadline = time.time() + 20
        while True:
            left, (progs, maps, links) = leftovers()
            if not any(left.values()) or time.time() > deadline:
                break
            time.sleep(1)
        named = lambda objs: sum(1 for v in objs.values() if v[0] in PROG_NAMES)  # noqa: E731
        report = {
            "cycles": cycles,
            "cycle_median_s": round(statistics.median(durations), 2),
            "program_ids_used": len(seen_progs), "map_ids_used": len(seen_maps), "link_ids_used": len(seen_links),
            "left": {k: len(v) for k, v in left.items()},
            "bpftool_before": {"programs": len(before_progs), "classifier_programs": named(before_progs),
                               "maps": len(before_maps), "links": len(before_links)},
            "bpftool_after": {"programs": len(progs), "classifier_programs": named(progs),
                              "maps": len(maps), "links": len(links)},
            "rss_warm_mib": round(rss_warm / 1024, 1), "rss_end_mib": round(rss_end / 1024, 1),
            "rss_change_pct": round(100 * (rss_end - rss_warm) / rss_warm, 1),
            "rss_low_mib": round(rss_low / 1024, 1),
            "rss_growth_over_low_pct": round(100 * (rss_end - rss_low) / rss_low, 1),
        }
        path = os.path.join(c.REPO, "target", "soak-report.json")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(report, f, indent=2)
        log(json.dumps(report))
        self.assertFalse(any(left.values()), f"left behind: {left}")
        self.assertLessEqual(abs(rss_end - rss_warm), 0.10 * rss_warm,
                             f"RSS {rss_warm} KiB after warm-up, {rss_end} KiB at the end")
        self.assertLessEqual(rss_end - rss_low, 0.10 * rss_low,
                             f"RSS grew: lowest {rss_low} KiB after warm-up ({rss_warm} KiB at warm-up), "
                             f"{rss_end} KiB at the end")


if __name__ == "__main__":
    unittest.main(verbosity=2)
