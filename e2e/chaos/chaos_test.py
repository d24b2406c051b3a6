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

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUN = os.path.join(REPO, ".run")
AGENT_BIN = os.environ.get("BPFPOLY_REL_AGENT", os.path.join(RUN, "rel", "bpfpoly-agent"))
NODE = "rel-node"
ROOT = "/sys/fs/bpf/bpfpoly-rel"
METRICS = "127.0.0.1:19464"
PROGRAM = "rel-chaos"
VETHS = [("brel0", "brel1"), ("brels0", "brels1"), ("brels2", "brels3")]
ALIASES = ["bpfpoly0=brels0", "bpfpoly1=brels1", "bpfpoly2=brels2", "bpfpoly3=brels3"]
REPORT = {}


def log(msg):
    print(f"[chaos] {msg}", flush=True)


def sh(*args, check=True, stdin=None, timeout=60):
    p = subprocess.run(args, capture_output=True, text=True, input=stdin, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({p.returncode}): {p.stderr.strip()}")
    return p.stdout


def kubectl(*args, check=True, stdin=None):
    return sh("kubectl", "--request-timeout=5s", *args, check=check, stdin=stdin)


def kjson(*args):
    out = kubectl("get", *args, "-o", "json", check=False)
    try:
        return json.loads(out) if out else None
    except json.JSONDecodeError:
        return None


def apply(obj):
    kubectl("apply", "-f", "-", stdin=json.dumps(obj))


def wait(what, fn, timeout=60, interval=0.2):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            last = fn()
            if last:
                return last
        except (AssertionError, KeyError, IndexError, TypeError, subprocess.SubprocessError, OSError) as e:
            last = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def bpftool(*args):
    return json.loads(sh("bpftool", "-j", *args) or "null")


def xdp_progs(dev):
    out = bpftool("net", "show", "dev", dev) or []
    return [x.get("id") for e in out for x in e.get("xdp", [])]


def prog_exists(pid):
    return subprocess.run(["bpftool", "prog", "show", "id", str(pid)], capture_output=True).returncode == 0


def veth(a, b):
    if subprocess.run(["ip", "link", "show", a], capture_output=True).returncode != 0:
        sh("ip", "link", "add", a, "type", "veth", "peer", "name", b)
    sh("ip", "link", "set", a, "up")
    sh("ip", "link", "set", b, "up")


def frame_udp(payload=b"x" * 32):
    eth = b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + struct.pack("!H", 0x0800)
    l4 = struct.pack("!HHHH", 1234, 53, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0, 64, 17, 0,
                     socket.inet_aton("10.99.0.1"), socket.inet_aton("10.99.0.2"))
    return eth + ip + l4


def send_udp(dev, n):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((dev, 0))
    f = frame_udp()
    for _ in range(n):
        s.send(f)
    s.close()


def node_state(node=NODE):
    return kjson("bns", node) or {}


def program_status(program, node=NODE):
    for p in node_state(node).get("status", {}).get("programs", []):
        if p["name"] == program:
            return p
    return None


def generation(program):
    return kjson("bpp", program)["metadata"]["generation"]


# --- the kernel side of this agent -----------------------------------------------------

def pinned_inventory(root=ROOT):
    """{program: {digest: {"progs": {id}, "links": {id: prog_id}, "maps": {id}}}} from the pins."""
    out = {}
    if not os.path.isdir(root):
        return out
    for program in os.listdir(root):
        pdir = os.path.join(root, program)
        if not os.path.isdir(pdir):
            continue
        out[program] = {}
        for digest in os.listdir(pdir):
            ddir = os.path.join(pdir, digest)
            inv = {"progs": set(), "links": {}, "maps": set()}
            for f in os.listdir(ddir):
                path = os.path.join(ddir, f)
                try:
                    if f.startswith("prog_"):
                        inv["progs"].add(bpftool("prog", "show", "pinned", path)["id"])
                    elif f.startswith("link_"):
                        link = bpftool("link", "show", "pinned", path)
                        inv["links"][link["id"]] = link.get("prog_id")
                    else:
                        inv["maps"].add(bpftool("map", "show", "pinned", path)["id"])
                except AssertionError:
                    inv.setdefault("unreadable", []).append(f)
            out[program][digest] = inv
    return out


def kernel_matches_status(root=ROOT, node=NODE):
    """None when every program of the node's status is pinned exactly once, with exactly
    the reported program ids and links to them; else what differs."""
    inv = pinned_inventory(root)
    st = node_state(node)
    reported = {p["name"]: p for p in st.get("status", {}).get("programs", [])}
    problems = []
    for program, versions in inv.items():
        if len(versions) != 1:
            problems.append(f"{program}: {len(versions)} pinned versions {sorted(versions)}")
            continue
        (digest, v), = versions.items()
        s = reported.get(program)
        if s is None or s.get("phase") not in ("Loaded", "Degraded"):
            problems.append(f"{program}: pinned but reported {s and s.get('phase')}")
            continue
        if set(s.get("programIds", [])) != v["progs"]:
            problems.append(f"{program}: pinned programs {sorted(v['progs'])} != reported {s.get('programIds')}")
        if any(pid not in v["progs"] for pid in v["links"].values()):
            problems.append(f"{program}: a link runs a program that is not pinned: {v['links']}")
        if v.get("unreadable"):
            problems.append(f"{program}: unreadable pins {v['unreadable']}")
    for name, s in reported.items():
        if s.get("phase") in ("Loaded", "Degraded") and name not in inv:
            problems.append(f"{name}: reported {s['phase']} but nothing is pinned")
    return problems or None


# --- this test's own agent -------------------------------------------------------------

class OwnAgent:
    def __init__(self, node=NODE, root=ROOT, metrics=METRICS, aliases=ALIASES, extra=()):
        self.node, self.root, self.metrics, self.extra = node, root, metrics, list(extra)
        self.aliases = aliases
        self.proc = None
        self.logfile = os.path.join(RUN, "rel", f"agent-{node}.log")

    def start(self):
        args = [AGENT_BIN, "run", "--node-name", self.node, "--kubeconfig", os.environ["KUBECONFIG"],
                "--bpffs-root", self.root, "--metrics-addr", self.metrics]
        for a in self.aliases:
            args += ["--interface-alias", a]
        args += self.extra
        logf = open(self.logfile, "a")
        logf.write(f"===== {time.strftime('%H:%M:%S')} start\n")
        logf.flush()
        self.proc = subprocess.Popen(args, stdout=logf, stderr=logf, stdin=subprocess.DEVNULL)
        logf.close()
        return self.proc.pid

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig=signal.SIGKILL):
        if self.alive():
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)

    def rss_kib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return None

    def log_tail(self, n=20):
        try:
            with open(self.logfile) as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def cleanup(self):
        """Stops the agent and removes everything it pinned (the node's objects stay)."""
        self.kill()
        subprocess.run([AGENT_BIN, "cleanup", "--bpffs-root", self.root], capture_output=True)
        try:
            os.rmdir(self.root)
        except OSError:
            pass


def status_apply(kind, name, status, check=True):
    """Writes `status` as the node's agent does (server-side apply with the field manager
    `bpfpoly-agent/<node>`; the operator ignores status written by anyone else)."""
    body = {"apiVersion": "bpfpoly.io/v1alpha1", "kind": kind, "metadata": {"name": name}, "status": status}
    return subprocess.run(["kubectl", "--request-timeout=5s", "apply", "--server-side", "--force-conflicts",
                           f"--field-manager=bpfpoly-agent/{name}", "--subresource=status", "--validate=false", "-f", "-"],
                          input=json.dumps(body), capture_output=True, text=True, check=check)


def node_object(name, labels):
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}}


def classifier(name, iface, count_bytes, selector):
    return {
        "apiVersion": "bpfpoly.io/v1alpha1", "kind": "BpfPolyProgram",
        "metadata": {"name": name},
        "spec": {
            "nodeSelector": {"matchLabels": selector},
            "variants": [{
                "name": "xdp-tailcall", "bytecode": {"builtin": "packet-classifier-xdp"},
                "dispatchMechanism": "tailCall",
                "programs": [
                    {"name": "classify", "attach": {"xdp": {"interfaces": [iface], "mode": "skb"}}},
                    {"name": "handle_tcp"}, {"name": "handle_udp"}, {"name": "handle_icmp"}]}],
            "dispatch": {"entry": "classify", "table": "jump_table", "slots": [
                {"key": 6, "handler": "handle_tcp"}, {"key": 17, "handler": "handle_udp"},
                {"key": 1, "handler": "handle_icmp"}]},
            "config": [{"name": "count_bytes", "type": "bool", "value": "true" if count_bytes else "false"},
                       {"name": "vlan_aware", "type": "bool", "value": "true"}],
            "rollout": {"pauseOnDegradedRatio": 1.0},
        },
    }


def converged(node=NODE, want=None):
    """Every program assigned to the node reports its assigned generation, settled; and the
    programs in `want` ({name: generation}) are assigned at that generation."""
    st = node_state(node)
    assigned = {a["name"]: a["generation"] for a in st.get("spec", {}).get("programs", [])}
    if any(assigned.get(n) != g for n, g in (want or {}).items()):
        return False
    reported = {p["name"]: p for p in st.get("status", {}).get("programs", [])}
    if not assigned:
        return False
    for name, gen in assigned.items():
        p = reported.get(name)
        if not p or p.get("observedGeneration") != gen or p.get("phase") not in ("Loaded", "Degraded", "Failed"):
            return False
    return True


def set_count_bytes(program, value):
    kubectl("patch", "bpp", program, "--type=json", "-p",
            json.dumps([{"op": "replace", "path": "/spec/config/0/value", "value": "true" if value else "false"}]))


def versions(program, root=ROOT):
    """{digest: recorded} of the program's pinned versions (recorded: `meta` is written)."""
    pdir = os.path.join(root, program)
    try:
        return {d: os.path.exists(os.path.join(pdir, d, "meta")) for d in os.listdir(pdir)}
    except OSError:
        return {}


def where_it_landed(before, after):
    """Where a SIGKILL hit an update, from the pins before the change and right after the kill."""
    if len(after) > 1 or not all(after.values()):
        return "mid-update"
    return "before the update" if set(after) == set(before) else "after the update"


def dispatch_count(program, key=17, root=ROOT):
    """Frames counted for `key` in the program's pinned per-CPU counters (bpftool)."""
    pdir = os.path.join(root, program)
    (digest,) = os.listdir(pdir)
    dump = bpftool("map", "dump", "pinned", os.path.join(pdir, digest, "bpfpoly_dispatch"))
    for entry in dump:
        f = entry.get("formatted", {})
        if f.get("key") == key:
            return sum(v["value"] for v in f["values"])
    return 0


def control_plane_pid(name):
    path = os.path.join(RUN, "cluster", f"{name}.pid")
    with open(path) as f:
        return int(f.read().strip())


def api_ready():
    return subprocess.run(["kubectl", "--request-timeout=2s", "get", "--raw", "/readyz"],
                          capture_output=True).returncode == 0


def wait_pid_gone(pid, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)


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
        operator_survived = _alive(op_pid)
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


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


NS = "bpfpoly-system"


def leader_pod():
    lease = kjson("lease", "-n", NS, "bpfpoly-operator") or {}
    return lease.get("spec", {}).get("holderIdentity") or ""


def operator_pid(pod=None):
    """The PID, on this machine, of the bpfpoly-operator process of the operator Pod `pod`
    (default: the leader, the Lease's holder): found by its command line and the POD_NAME its
    container's environment carries."""
    pod = pod or leader_pod()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
            if not cmd[0].endswith(b"bpfpoly-operator") or cmd[1:2] != [b"run"]:
                continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                if f"POD_NAME={pod}".encode() in f.read().split(b"\0"):
                    return int(pid)
        except (OSError, IndexError):
            continue
    raise AssertionError(f"no bpfpoly-operator process of Pod {NS}/{pod} on this machine")


def pods_state():
    """Each operator and agent Pod of `make run`: (Ready, container restarts)."""
    out = {}
    for p in (kjson("pods", "-n", NS) or {}).get("items", []):
        cs = p["status"].get("containerStatuses", [])
        out[p["metadata"]["name"]] = (all(c["ready"] for c in cs) and bool(cs), sum(c["restartCount"] for c in cs))
    return out


def restart_operator():
    """SIGKILLs the leading operator's process in its Pod (no release of the Lease: a crash).
    The kubelet restarts the container, and whoever holds the Lease next (the restarted
    container, which has the same identity, or the standby once the term runs out) leads;
    returns when a live operator Pod holds it, with how long that took."""
    pod = leader_pod()
    pid = operator_pid(pod)
    t0 = time.time()
    os.kill(pid, signal.SIGKILL)
    wait_pid_gone(pid)

    def leading():
        h = leader_pod()
        return h and pods_state().get(h, (False, 0))[0] and h

    # The killed container must have been restarted (or replaced) before it counts as leading.
    wait("the killed operator's container restarted",
         lambda: pods_state().get(pod, (True, 1))[1] >= 1 or pod not in pods_state(), timeout=60, interval=0.2)
    holder = wait("a live operator Pod holding the Lease", leading, timeout=90, interval=0.2)
    return {"old_pod": pod, "old_pid": pid, "new_leader": holder, "leading_after_s": round(time.time() - t0, 2)}


class SimulatedAgents:
    """Agents for simulated nodes: every program assigned is reported Loaded at its
    generation, after `delay[program]` seconds (0 for the rest, e.g. the samples)."""

    def __init__(self, nodes, delay):
        self.nodes, self.delay = nodes, delay
        self.state = {}  # node -> {program: (assigned gen, reported gen)}
        self.lock = threading.Lock()
        self.stop_ev = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.pending = {}

    def start(self):
        self.thread.start()

    def stop(self):
        self.stop_ev.set()
        self.thread.join()

    def assigned(self, node, program):
        with self.lock:
            return self.state.get(node, {}).get(program, (None, None))[0]

    def reported(self, node, program):
        with self.lock:
            return self.state.get(node, {}).get(program, (None, None))[1]

    def run(self):
        while not self.stop_ev.is_set():
            states = kjson("bns", *self.nodes) or {"items": []}
            if "items" not in states:
                states = {"items": [states]}
            now = time.time()
            for st in states["items"]:
                node = st["metadata"]["name"]
                if node not in self.nodes:
                    continue
                assigned = {a["name"]: a["generation"] for a in st.get("spec", {}).get("programs", [])}
                variants = {a["name"]: (a.get("candidates") or [{}])[0].get("name", "-")
                            for a in st.get("spec", {}).get("programs", [])}
                reported = {p["name"]: p.get("observedGeneration") for p in st.get("status", {}).get("programs", [])}
                want = {}
                for name, gen in assigned.items():
                    key = (node, name, gen)
                    if reported.get(name) == gen:
                        want[name] = gen
                        continue
                    due = self.pending.setdefault(key, now + self.delay.get(name, 0))
                    want[name] = gen if now >= due else reported.get(name)
                with self.lock:
                    self.state[node] = {n: (assigned.get(n), reported.get(n)) for n in set(assigned) | set(reported)}
                if any(want.get(n) != reported.get(n) for n in want):
                    programs = [{"name": n, "observedGeneration": g, "phase": "Loaded", "variant": variants.get(n, "-"),
                                 "message": "simulated"} for n, g in sorted(want.items()) if g is not None]
                    status_apply("BpfNodeState", node, {"programs": programs}, check=False)
            time.sleep(0.1)


if __name__ == "__main__":
    unittest.main(verbosity=2, failfast=False)
