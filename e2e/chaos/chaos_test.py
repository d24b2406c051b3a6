"""Chaos on the real stack that `make run` starts (`make chaos`, e2e/chaos/chaos.sh), as root.

The agent under test is this file's OWN agent process (node `rel-node`, bpffs root
/sys/fs/bpf/bpfpoly-rel, metrics 127.0.0.1:19464), so the shared agents are never killed.
It runs every program that selects its node: `rel-chaos` (an XDP classifier on its own
veth `brel0`) and the samples (their interfaces renamed to its own veths `brels0-3`).

  1. SIGKILL the agent N times (BPFPOLY_CHAOS_KILLS, default 20) at random points of load
     (right after start: adoption, first loads) and update (a config value flipped just
     before): after each restart every assigned program converges (observedGeneration
     current), the kernel holds exactly what the status reports (pinned programs == status
     program ids, one version per program), and the interface never has two XDP programs.
  2. Restart the operator mid-rollout (simulated nodes: Node objects, profiles copied from
     node `local`, and a simulated agent in this process reporting Loaded after a delay):
     canary first, at most maxUnavailable in flight, before and after the restart; every
     node reaches the new generation. The operator is the shared one (there can be only one
     leader): the leading operator Pod's process is SIGKILLed (a crash: the Lease is not
     released) and the kubelet restarts its container.
  3. Stop the API server for BPFPOLY_CHAOS_APISERVER_DOWN seconds (default 60): programs keep
     running (frames sent meanwhile are counted in the pinned map, read with bpftool);
     after it returns, a change converges through the operator and the agent (measured).
  4. Restart etcd (down BPFPOLY_CHAOS_ETCD_DOWN seconds, default 10): same measurement.

BPFPOLY_CHAOS_CONTROL_PLANE=0 skips 2-4 (they disturb everyone using the stack).
Numbers are printed and written to target/chaos-report.json.
"""

import json
import os
import random
import signal
import socket
import struct
import subprocess
import threading
import time
import unittest


from chaos_support import *  # noqa: F401,F403  (helpers shared with soak_test.py)


class Chaos(unittest.TestCase):
    agent = None

    @classmethod
    def setUpClass(cls):
        if os.geteuid() != 0:
            raise AssertionError("chaos loads eBPF programs and kills processes: run it as root")
        assert os.path.exists(AGENT_BIN), f"{AGENT_BIN} missing (e2e/chaos/chaos.sh copies it there)"
        os.makedirs(os.path.join(RUN, "rel"), exist_ok=True)
        for a, b in VETHS:
            veth(a, b)
        apply(node_object(NODE, {"bpfpoly.io/rel": "chaos"}))
        subprocess.run([AGENT_BIN, "cleanup", "--bpffs-root", ROOT], capture_output=True)
        cls.agent = OwnAgent()
        cls.agent.start()
        wait("the agent's profile", lambda: (kjson("bnp", NODE) or {}).get("status", {}).get("kernel"))

    @classmethod
    def tearDownClass(cls):
        steps = [
            lambda: sh("kubectl", "delete", "bpp", PROGRAM, "--ignore-not-found", "--wait=true", "--timeout=60s",
                       check=False, timeout=90),
            lambda: cls.agent and cls.agent.cleanup(),
            lambda: kubectl("delete", "node", NODE, "--ignore-not-found", check=False),
        ] + [lambda a=a: subprocess.run(["ip", "link", "del", a], capture_output=True) for a, _ in VETHS]
        for step in steps:
            try:
                step()
            except (AssertionError, subprocess.SubprocessError, OSError) as e:
                log(f"teardown: {e}")
        path = os.path.join(REPO, "target", "chaos-report.json")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(REPORT, f, indent=2)
        log(f"report: {json.dumps(REPORT)}")

    def ensure_program(self):
        if kjson("bpp", PROGRAM) is None:
            apply(classifier(PROGRAM, "brel0", True, {"bpfpoly.io/rel": "chaos"}))
        wait("rel-chaos Loaded on rel-node", lambda: (program_status(PROGRAM) or {}).get("observedGeneration")
             == generation(PROGRAM) and program_status(PROGRAM)["phase"] == "Loaded", timeout=90)

    # ---------------------------------------------------------------------------------
    def test_0_restart_after_the_node_answered_queries(self):
        """An agent whose profile holds answers from before starts again (Kubernetes 1.20's
        server-side apply nulls a map whose last owned keys are removed: 422)."""
        status = dict(kjson("bnp", NODE)["status"])
        status["answers"] = {"type:struct task_struct": True, "func:do_sys_openat2": True}
        body = {"apiVersion": "bpfpoly.io/v1alpha1", "kind": "BpfNodeProfile", "metadata": {"name": NODE},
                "status": status}
        sh("kubectl", "apply", "--server-side", "--force-conflicts", f"--field-manager=bpfpoly-agent/{NODE}",
           "--subresource=status", "--validate=false", "-f", "-", stdin=json.dumps(body))
        self.agent.kill()
        self.agent.start()
        wait("the restarted agent publishes its profile", lambda: not (kjson("bnp", NODE) or {}).get(
            "status", {}).get("answers"), timeout=30)
        time.sleep(2)
        self.assertTrue(self.agent.alive(), self.agent.log_tail())

    def test_1_sigkill_during_load_and_update(self):
        kills = int(os.environ.get("BPFPOLY_CHAOS_KILLS", "20"))
        rng = random.Random(int(os.environ.get("BPFPOLY_CHAOS_SEED", str(int(time.time())))))
        self.ensure_program()
        xdp_seen = []
        stop = threading.Event()

        def watch_xdp():
            # Duplicate attach would show as two programs on the interface at some instant.
            while not stop.is_set():
                try:
                    xdp_seen.append(len(xdp_progs("brel0")))
                except (AssertionError, ValueError):
                    pass
                time.sleep(0.05)

        watcher = threading.Thread(target=watch_xdp, daemon=True)
        watcher.start()
        value = False
        times, ever_ids = [], set()
        landed = {"before the update": 0, "mid-update": 0, "after the update": 0}
        try:
            for i in range(kills):
                during = "update" if i % 4 != 0 else "start"
                if during == "update":
                    # An update in flight: the operator writes the new generation, the agent
                    # fetches, loads, attaches, pins; the kill lands anywhere in there.
                    before = versions(PROGRAM)
                    set_count_bytes(PROGRAM, value)
                    value = not value
                    if i % 2:
                        # As soon as the new version's pin directory appears: mid-load.
                        deadline = time.time() + 3
                        while set(versions(PROGRAM)) == set(before) and time.time() < deadline:
                            pass
                        time.sleep(rng.uniform(0.0, 0.03))
                    else:
                        time.sleep(rng.uniform(0.0, 0.3))
                    self.agent.kill()
                    landed[where_it_landed(before, versions(PROGRAM))] += 1
                    self.agent.start()
                else:
                    # Killed while starting: profiling, adoption, the first reconcile.
                    self.agent.kill()
                    self.agent.start()
                    time.sleep(rng.uniform(0.05, 1.5))
                    self.agent.kill()
                    set_count_bytes(PROGRAM, value)
                    value = not value
                    self.agent.start()
                t0 = time.time()
                gen = generation(PROGRAM)
                wait(f"kill {i + 1}: convergence", lambda: converged(want={PROGRAM: gen}), timeout=60)
                times.append(time.time() - t0)
                try:
                    wait(f"kill {i + 1}: kernel matches status", lambda: kernel_matches_status() is None, timeout=10)
                except AssertionError:
                    self.fail(f"kill {i + 1}: {kernel_matches_status()}")
                s = program_status(PROGRAM)
                self.assertEqual(s["observedGeneration"], generation(PROGRAM))
                self.assertEqual(len(xdp_progs("brel0")), 1, "one XDP program on brel0")
                self.assertIn(xdp_progs("brel0")[0], s["programIds"])
                ever_ids |= set(s["programIds"])
                log(f"kill {i + 1:2}/{kills} during {during:6}: converged in {times[-1]:.2f} s, "
                    f"generation {s['observedGeneration']}, programs {s['programIds']}")
        finally:
            stop.set()
            watcher.join()
        # Old versions are gone from the kernel, not only from the pins.
        current = set(program_status(PROGRAM)["programIds"])
        wait("old programs freed", lambda: not any(prog_exists(p) for p in ever_ids - current), timeout=15)
        self.assertLessEqual(max(xdp_seen), 1, "never two XDP programs on brel0")
        REPORT["sigkill"] = {"kills": kills, "converge_max_s": round(max(times), 2),
                             "converge_median_s": round(sorted(times)[len(times) // 2], 2),
                             "xdp_samples": len(xdp_seen), "max_xdp_attached": max(xdp_seen),
                             "update_kills_landed": landed, "leaked_programs": 0}
        log(f"{kills} SIGKILLs: convergence median {REPORT['sigkill']['converge_median_s']} s, "
            f"max {REPORT['sigkill']['converge_max_s']} s; {len(xdp_seen)} samples of brel0, never two programs; "
            f"update kills landed {landed}")

    # ---------------------------------------------------------------------------------
    def test_2_operator_restart_mid_rollout(self):
        if os.environ.get("BPFPOLY_CHAOS_CONTROL_PLANE", "1") == "0":
            self.skipTest("BPFPOLY_CHAOS_CONTROL_PLANE=0")
        n = 6
        nodes = [f"rel-sim-{i}" for i in range(n)]
        program = "rel-rollout"
        local = kjson("bnp", "local")
        assert local and local.get("status"), "node local's profile is the template of the simulated nodes"
        for node in nodes:
            apply(node_object(node, {"bpfpoly.io/rel": "rollout", "bpfpoly.io/simulated": "true"}))
            apply({"apiVersion": "bpfpoly.io/v1alpha1", "kind": "BpfNodeProfile", "metadata": {"name": node}, "spec": {}})
            status_apply("BpfNodeProfile", node, dict(local["status"]))
        sim = SimulatedAgents(nodes, delay={program: 1.5})
        sim.start()
        prog = classifier(program, "brelsim0", True, {"bpfpoly.io/rel": "rollout"})
        prog["spec"]["rollout"] = {"canary": 1, "maxUnavailable": 1, "pauseOnDegradedRatio": 1.0}
        violations = []
        try:
            apply(prog)
            wait("generation 1 everywhere", lambda: all(sim.reported(nd, program) == 1 for nd in nodes), timeout=90)
            # Generation 2 rolls out one node at a time; the operator dies after two nodes.
            set_count_bytes(program, False)
            gen = generation(program)
            stop = threading.Event()
            timeline = []

            def observe():
                while not stop.is_set():
                    assigned = {nd: sim.assigned(nd, program) for nd in nodes}
                    reported = {nd: sim.reported(nd, program) for nd in nodes}
                    updated = [nd for nd in nodes if assigned[nd] == gen]
                    in_flight = [nd for nd in updated if reported[nd] != gen]
                    timeline.append((time.time(), len(updated), len(in_flight)))
                    if len(in_flight) > 1:
                        violations.append(f"{len(in_flight)} nodes in flight: {in_flight}")
                    if updated and nodes[0] not in updated:
                        violations.append(f"{updated} updated before the canary {nodes[0]}")
                    if any(nd != nodes[0] for nd in updated) and reported[nodes[0]] != gen:
                        violations.append(f"{updated} updated before the canary reported")
                    time.sleep(0.1)

            watcher = threading.Thread(target=observe, daemon=True)
            watcher.start()
            wait("two nodes at generation 2", lambda: sum(sim.reported(nd, program) == gen for nd in nodes) >= 2,
                 timeout=60, interval=0.05)
            before = sum(sim.assigned(nd, program) == gen for nd in nodes)
            t_kill = time.time()
            restart = restart_operator()
            t_back = time.time()
            wait("the rollout completes", lambda: all(sim.reported(nd, program) == gen for nd in nodes), timeout=120)
            t_done = time.time()
            stop.set()
            watcher.join()
            # The first node updated after the restart.
            after = [t for (t, updated, _) in timeline if t > t_back and updated > before]
            first_wave = (after[0] - t_back) if after else None
        finally:
            # The simulated agents report the unload, so the finalizer lets go.
            try:
                kubectl("delete", "bpp", program, "--ignore-not-found", "--wait=false", check=False)
                wait("rel-rollout gone", lambda: kjson("bpp", program) is None, timeout=90)
            finally:
                sim.stop()
                for node in nodes:
                    kubectl("delete", "node", node, "--ignore-not-found", check=False)
        self.assertEqual(violations, [], "rollout order kept across the restart")
        REPORT["operator_restart"] = {"simulated_nodes": n, "nodes_updated_before_restart": before,
                                      "restart": restart, "first_wave_after_restart_s": round(first_wave or -1, 2),
                                      "rollout_done_after_restart_s": round(t_done - t_back, 2),
                                      "violations": len(violations)}
        log(f"operator restart mid-rollout: {REPORT['operator_restart']}")

    # ---------------------------------------------------------------------------------
    def _reconverge_after(self, what, stop_fn, start_fn, down_s):
        self.ensure_program()
        op_pod = leader_pod()
        op_pid = operator_pid(op_pod)
        restarts_before = pods_state()
        before = dispatch_count(PROGRAM)
        ids = program_status(PROGRAM)["programIds"]
        stop_fn()
        t_down = time.time()
        self.assertFalse(api_ready() and what == "apiserver", "the API server is down")
        sent = 0
        while time.time() - t_down < down_s:
            send_udp("brel1", 50)
            sent += 50
            time.sleep(1)
        counted_during = dispatch_count(PROGRAM) - before
        self.assertEqual(xdp_progs("brel0"), [i for i in xdp_progs("brel0") if i in ids])
        self.assertGreaterEqual(counted_during, sent, "frames counted while the control plane was down")
        self.assertTrue(self.agent.alive(), self.agent.log_tail())
        start_fn()
        t_back = wait("the API server ready", api_ready, timeout=120, interval=0.1) and time.time()
        time.sleep(0.5)
        operator_survived = pid_alive(op_pid)
        if not operator_survived:
            # Its container is restarted by the kubelet (the operator's supervisor in a cluster).
            log(f"{what}: the operator (Pod {op_pod}, pid {op_pid}) exited during the outage")
        # A change made right after it returns: the operator assigns, the agent loads, both report.
        current = kjson("bpp", PROGRAM)["spec"]["config"][0]["value"]
        set_count_bytes(PROGRAM, current != "true")
        gen = generation(PROGRAM)

        def done():
            s = program_status(PROGRAM)
            p = kjson("bpp", PROGRAM)
            ready = [c for c in p.get("status", {}).get("conditions", []) if c["type"] == "Ready"]
            return (s and s["observedGeneration"] == gen and s["phase"] == "Loaded"
                    and p["status"].get("observedGeneration") == gen and ready and ready[0]["status"] == "True")

        t_change = time.time()
        wait(f"reconvergence after {what}", done, timeout=120, interval=0.1)
        t_conv = time.time()
        after = pods_state()
        alive = {p: {"ready": r, "restarts": n - restarts_before.get(p, (False, n))[1]} for p, (r, n) in after.items()}
        result = {"down_s": round(t_back - t_down, 1), "operator_survived": operator_survived,
                  "frames_sent_while_down": sent,
                  "frames_counted_while_down": counted_during,
                  "reconverge_after_return_s": round(t_conv - t_back, 2),
                  "change_to_converged_s": round(t_conv - t_change, 2), "shared_pods": alive}
        log(f"{what}: {result}")
        return result

    def test_3_apiserver_down(self):
        if os.environ.get("BPFPOLY_CHAOS_CONTROL_PLANE", "1") == "0":
            self.skipTest("BPFPOLY_CHAOS_CONTROL_PLANE=0")
        down = float(os.environ.get("BPFPOLY_CHAOS_APISERVER_DOWN", "60"))

        def stop():
            pid = control_plane_pid("kube-apiserver")
            os.kill(pid, signal.SIGTERM)
            wait_pid_gone(pid)

        def start():
            sh("bash", os.path.join(REPO, "e2e", "env", "cluster.sh"), "up", timeout=180)

        r = self._reconverge_after("apiserver", stop, start, down)
        REPORT["apiserver_down"] = r
        self.assertLessEqual(r["reconverge_after_return_s"], 10, r)

    def test_4_etcd_restart(self):
        if os.environ.get("BPFPOLY_CHAOS_CONTROL_PLANE", "1") == "0":
            self.skipTest("BPFPOLY_CHAOS_CONTROL_PLANE=0")
        down = float(os.environ.get("BPFPOLY_CHAOS_ETCD_DOWN", "10"))

        def stop():
            pid = control_plane_pid("etcd")
            os.kill(pid, signal.SIGTERM)
            wait_pid_gone(pid)

        def start():
            sh("bash", os.path.join(REPO, "e2e", "env", "cluster.sh"), "up", timeout=180)

        r = self._reconverge_after("etcd", stop, start, down)
        REPORT["etcd_restart"] = r
        self.assertLessEqual(r["reconverge_after_return_s"], 10, r)




if __name__ == "__main__":
    unittest.main(verbosity=2, failfast=False)
