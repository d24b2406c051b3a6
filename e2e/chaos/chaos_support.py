"""What the chaos scenarios (chaos_test.py) and the soak (soak_test.py) share: kubectl and
bpftool helpers, frames on veths, this test's own agent process and its kernel side, the
operator and control-plane processes, and simulated agents for the operator at scale."""

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



def pid_alive(pid):
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


SIMULATED_BOOT = "simulated-boot"


def lease_apply(node, boot=SIMULATED_BOOT):
    """Renews `node`'s agent liveness Lease as its agent does (kube-node-lease/bpfpoly-agent-<node>,
    field manager bpfpoly-agent/<node>): the operator counts a node whose Lease is not renewed
    within --node-lost-after as lost, and its reports with it."""
    now = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1e6) % 1000000:06d}Z"
    body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": f"bpfpoly-agent-{node}", "namespace": "kube-node-lease",
                         "labels": {"bpfpoly.io/agent-lease": "true"},
                         "annotations": {"bpfpoly.io/boot-id": boot}},
            "spec": {"holderIdentity": node, "leaseDurationSeconds": 20, "renewTime": now}}
    return subprocess.run(["kubectl", "--request-timeout=5s", "apply", "--server-side", "--force-conflicts",
                           f"--field-manager=bpfpoly-agent/{node}", "-f", "-"],
                          input=json.dumps(body), capture_output=True, text=True, check=False)


class SimulatedAgents:
    """Agents for simulated nodes: every program assigned is reported Loaded at its
    generation, after `delay[program]` seconds (0 for the rest, e.g. the samples), and each
    node's liveness Lease is renewed every 2 s (removed on stop). Reports and Leases name the
    same boot, as a real agent's do, so the operator counts the reports."""

    def __init__(self, nodes, delay):
        self.nodes, self.delay = nodes, delay
        self.state = {}  # node -> {program: (assigned gen, reported gen)}
        self.lock = threading.Lock()
        self.stop_ev = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.renewer = threading.Thread(target=self.renew, daemon=True)
        self.pending = {}

    def start(self):
        for node in self.nodes:
            lease_apply(node)
        self.renewer.start()
        self.thread.start()

    def stop(self):
        self.stop_ev.set()
        self.thread.join()
        self.renewer.join()
        for node in self.nodes:
            kubectl("delete", "lease", "-n", "kube-node-lease", f"bpfpoly-agent-{node}", "--ignore-not-found",
                    check=False)

    def assigned(self, node, program):
        with self.lock:
            return self.state.get(node, {}).get(program, (None, None))[0]

    def reported(self, node, program):
        with self.lock:
            return self.state.get(node, {}).get(program, (None, None))[1]

    def renew(self):
        while not self.stop_ev.is_set():
            for node in self.nodes:
                lease_apply(node)
            self.stop_ev.wait(2)

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
                variants = {a["name"]: (a.get("variants") or ["-"])[0]
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
                    status_apply("BpfNodeState", node, {"programs": programs, "bootId": SIMULATED_BOOT}, check=False)
            time.sleep(0.1)
