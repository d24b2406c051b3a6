"""End-to-end scenarios on the real stack that `make run` starts: the local cluster with the
real kubelet node `local` (this machine's kernel), the chart installed with the Helm SDK (the
operator Deployment and the agent DaemonSet as Pods), and node `debian-6-1`, Debian's real 6.1
kernel in a qemu microVM with its own agent (e2e/kernels/vm.sh).

The agent Pod runs on the host network (its /metrics on 127.0.0.1); the leading operator's
/metrics are read at its Pod IP on the node's bridge (the Lease names the leader).

Each scenario asserts the API objects (kubectl), the kernel state (bpftool) and /metrics.
Run by `make e2e` (e2e/scenarios/e2e.sh), as root.
"""

import json
import os
import re
import socket
import struct
import subprocess
import threading
import time
import unittest
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target")), "release")
AGENT_METRICS = f"http://127.0.0.1:{os.environ.get('BPFPOLY_AGENT_METRICS_PORT', '9464')}/metrics"
# Node debian-6-1: the microVM's agent, through its hostfwd (vm.sh: BASE + index of 6.1).
OLD_NODE = "debian-6-1"
OLD_METRICS = f"http://127.0.0.1:{int(os.environ.get('BPFPOLY_VM_METRICS_BASE', '9470')) + 1}/metrics"
BPFFS = os.environ.get("BPFPOLY_BPFFS_ROOT", "/sys/fs/bpf/bpfpoly")


def sh(*args, check=True, stdin=None):
    p = subprocess.run(args, capture_output=True, text=True, input=stdin)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({p.returncode}): {p.stderr.strip()}")
    return p.stdout


def kubectl_json(*args):
    return json.loads(sh("kubectl", *args, "-o", "json"))


def operator_metrics_url():
    """The leading operator Pod's /metrics: the Lease's holder, at its Pod IP."""
    leader = kubectl_json("get", "lease", "-n", "bpfpoly-system", "bpfpoly-operator")["spec"]["holderIdentity"]
    ip = kubectl_json("get", "pod", "-n", "bpfpoly-system", leader)["status"]["podIP"]
    return f"http://{ip}:9465/metrics"


def apply(doc):
    sh("kubectl", "apply", "-f", "-", stdin=doc)


def metrics(url=AGENT_METRICS):
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


def metric(text, name, **labels):
    """Sum of the samples of `name` whose labels include `labels`."""
    total, found = 0.0, False
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        m = re.match(r'^([a-z_]+)(?:\{(.*)\})? ([0-9.e+-]+)$', line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'([a-z_]+)="([^"]*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
            found = True
    return total if found else None


def wait(what, fn, timeout=90):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            last = fn()
            if last:
                return last
        except (AssertionError, KeyError, IndexError, subprocess.SubprocessError, OSError) as e:
            last = e
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def program_status(node, program):
    st = kubectl_json("get", "bns", node)
    for p in st.get("status", {}).get("programs", []):
        if p["name"] == program:
            return p
    return None


def condition(program, type_):
    obj = kubectl_json("get", "bpp", program)
    for c in obj.get("status", {}).get("conditions", []):
        if c["type"] == type_:
            return c
    return None


def ready(program):
    c = condition(program, "Ready")
    obj = kubectl_json("get", "bpp", program)
    return c and c["status"] == "True" and c.get("observedGeneration") == obj["metadata"]["generation"]


def bpftool_prog_ids():
    return {p["id"] for p in json.loads(sh("bpftool", "-j", "prog", "show"))}


def bpftool_link_prog_ids():
    return {l.get("prog_id") for l in json.loads(sh("bpftool", "-j", "link", "show"))}


def xdp_progs(dev):
    out = json.loads(sh("bpftool", "-j", "net", "show", "dev", dev))
    progs = []
    for entry in out:
        for x in entry.get("xdp", []):
            progs.append(x.get("id"))
    return progs


def frame(proto, payload=b"x" * 32):
    """Ethernet + IPv4 + TCP/UDP/ICMP header, enough for the classifier."""
    eth = b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + struct.pack("!H", 0x0800)
    l4 = {6: struct.pack("!HHIIBBHHH", 1234, 80, 0, 0, 0x50, 0x02, 1024, 0, 0),
          17: struct.pack("!HHHH", 1234, 53, 8 + len(payload), 0),
          1: struct.pack("!BBHHH", 8, 0, 0, 1, 1)}[proto] + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0, 64, proto, 0,
                     socket.inet_aton("10.99.0.1"), socket.inet_aton("10.99.0.2"))
    return eth + ip + l4


def send(dev, proto, n):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((dev, 0))
    f = frame(proto)
    for _ in range(n):
        s.send(f)
    s.close()


def veth(a, b):
    if subprocess.run(["ip", "link", "show", a], capture_output=True).returncode != 0:
        sh("ip", "link", "add", a, "type", "veth", "peer", "name", b)
    sh("ip", "link", "set", a, "up")
    sh("ip", "link", "set", b, "up")


BADHANDLER = """
apiVersion: bpfpoly.io/v1alpha1
kind: BpfPolyProgram
metadata: {name: e2e-badhandler}
spec:
  nodeSelector: {matchLabels: {kubernetes.io/hostname: local}}
  variants:
  - name: xdp-tailcall
    bytecode: {builtin: fallback-fixtures-badhandler}
    dispatchMechanism: tailCall
    programs:
    - name: classify
      attach: {xdp: {interfaces: [bpfe2e0], mode: skb}}
    - {name: handle_tcp}
    - {name: handle_udp}
    - {name: handle_icmp}
  dispatch:
    entry: classify
    slots:
    - {key: 6, handler: handle_tcp}
    - {key: 17, handler: handle_udp}
    - {key: 1, handler: handle_icmp}
  fallback: {onHandlerReject: DefaultPath}
  rollout: {pauseOnDegradedRatio: 1.0}
"""


class Scenarios(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        if os.geteuid() != 0:
            raise AssertionError("the e2e scenarios load eBPF programs: run them as root")
        # Node `local` carries the hostname label the scenarios select on.
        sh("kubectl", "label", "node", "local", "kubernetes.io/hostname=local", "--overwrite")
        for p in ["exec-tracer", "packet-classifier", "rejected-variant", "classifier-config-fallback"]:
            wait(f"{p} Ready", lambda p=p: ready(p), timeout=120)

    def test_1_samples_ready_and_variants_differ_by_btf(self):
        local = program_status("local", "classifier-config-fallback")
        old = program_status(OLD_NODE, "classifier-config-fallback")
        self.assertEqual(local["variant"], "xdp-modern")
        self.assertEqual(old["variant"], "tc-legacy", "6.1 BTF lacks struct bpf_iter_num")
        self.assertIn("on tc (netlink) bpfpoly1 (ingress)", old["message"], "no TCX before 6.6: legacy tc")
        st = kubectl_json("get", "bns", OLD_NODE)
        # The node state names the globals that fell back (with why, once per node, with the
        # programs each applies to); the value written is the program's fallback, read by the
        # agent (its status message says which).
        entry = [a for a in st["spec"]["programs"] if a["name"] == "classifier-config-fallback"][0]
        self.assertNotIn("configFallbacks", entry)
        fell = {c["name"]: c["reason"] for c in st["spec"].get("configFallbacks", [])
                if "classifier-config-fallback" in c["programs"]}
        self.assertIn("count_bytes", fell, st["spec"])
        self.assertIn("kernel", fell["count_bytes"], st["spec"])
        self.assertEqual(entry["variants"][0], "tc-legacy", entry)
        self.assertIn("config fallbacks: count_bytes=false", old["message"])
        explain = sh(os.path.join(BIN, "bpfpoly-operator"), "explain", "classifier-config-fallback")
        self.assertIn("rejected xdp-modern: kernel >=6.6 kernel is 6.1.0", explain)
        self.assertIn("config count_bytes = false (fallback:", explain)
        # The kernel runs what the status says (this host's; the 6.1 node's kernel is its own).
        ids = bpftool_prog_ids()
        for node in ["local", OLD_NODE]:
            for p in ["exec-tracer", "packet-classifier", "rejected-variant", "classifier-config-fallback"]:
                s = program_status(node, p)
                self.assertTrue(s["programIds"], f"{node}/{p} has no program ids")
                if node == "local":
                    self.assertTrue(set(s["programIds"]) <= ids, f"{node}/{p}: {s['programIds']} not all in bpftool")
        self.assertEqual(metric(metrics(), "bpfpoly_program_info", program="classifier-config-fallback", variant="xdp-modern"), 1)
        self.assertEqual(metric(metrics(OLD_METRICS), "bpfpoly_program_info", program="classifier-config-fallback", variant="tc-legacy"), 1)
        # Both agents' own status is believed: nothing ignored as written by someone else.
        op = metrics(operator_metrics_url())
        self.assertEqual(metric(op, "bpfpoly_ignored_node_status", kind="state"), 0)
        self.assertEqual(metric(op, "bpfpoly_ignored_node_status", kind="profile"), 0)

    def test_2_rejected_variant_degrades_with_event_metric_and_log(self):
        c = condition("rejected-variant", "Degraded")
        self.assertEqual(c["status"], "True")
        self.assertIn("unchecked-read -> xdp-default-path at verify", c["message"])
        s = program_status("local", "rejected-variant")
        self.assertEqual(s["phase"], "Degraded")
        f = s["fallbacks"][0]
        self.assertEqual((f["from"], f["to"], f["stage"]), ("unchecked-read", "xdp-default-path", "verify"))
        self.assertIn("outside of the packet", f["verifierLog"])
        self.assertLessEqual(len(f["verifierLog"].encode()), 4096)
        events = kubectl_json("get", "events.events.k8s.io", "-n", "default")["items"]
        self.assertTrue(any(e.get("reason") == "VerifierRejected" and e["regarding"]["name"] == "rejected-variant"
                            for e in events), "a VerifierRejected Event for rejected-variant")
        self.assertGreaterEqual(metric(metrics(), "bpfpoly_verifier_rejections_total", program="rejected-variant",
                                       variant="unchecked-read") or 0, 1)

    def test_3_kprobe_attach_failure_falls_back(self):
        s = program_status("local", "exec-tracer")
        self.assertEqual(s["variant"], "tp-btf")
        f = s["fallbacks"][0]
        self.assertEqual((f["from"], f["to"], f["stage"]), ("kprobe", "tp-btf", "attach"))
        self.assertIn("kprobe", f["reason"])
        self.assertGreaterEqual(metric(metrics(), "bpfpoly_variant_fallbacks_total", program="exec-tracer",
                                       stage="attach") or 0, 1)
        # tp_btf is attached in the kernel: a link for each exec-tracer program id.
        self.assertTrue(set(s["programIds"]) <= bpftool_link_prog_ids())

    def test_4_rejected_handler_sends_its_keys_to_the_default_path(self):
        veth("bpfe2e0", "bpfe2e1")
        apply(BADHANDLER)
        try:
            s = wait("badhandler loaded", lambda: (program_status("local", "e2e-badhandler") or {}).get("phase") == "Degraded"
                     and program_status("local", "e2e-badhandler"))
            udp = [h for h in s["handlers"] if h["key"] == 17][0]
            self.assertEqual(udp["state"], "Empty")
            self.assertEqual(len(xdp_progs("bpfe2e0")), 1, "one XDP program on the interface")
            before = metrics()
            d0 = metric(before, "bpfpoly_dispatch_default_total", program="e2e-badhandler") or 0
            u0 = metric(before, "bpfpoly_dispatch_total", program="e2e-badhandler", key="17") or 0
            t0 = metric(before, "bpfpoly_dispatch_total", program="e2e-badhandler", key="6") or 0
            send("bpfe2e1", 17, 50)
            send("bpfe2e1", 6, 20)
            after = wait("frames counted", lambda: (lambda m: m if (metric(m, "bpfpoly_dispatch_default_total",
                         program="e2e-badhandler") or 0) >= d0 + 50 else None)(metrics()), timeout=20)
            self.assertEqual(metric(after, "bpfpoly_dispatch_default_total", program="e2e-badhandler") - d0, 50)
            self.assertEqual((metric(after, "bpfpoly_dispatch_total", program="e2e-badhandler", key="17") or 0) - u0, 0)
            self.assertEqual(metric(after, "bpfpoly_dispatch_total", program="e2e-badhandler", key="6") - t0, 20)
            self.assertEqual(metric(after, "bpfpoly_handler_degraded", program="e2e-badhandler", key="17"), 1)
        finally:
            sh("kubectl", "delete", "bpp", "e2e-badhandler", "--wait=true", "--timeout=60s", check=False)
            sh("ip", "link", "del", "bpfe2e0", check=False)

    def test_5_config_update_is_make_before_break(self):
        dev_in, dev_out = "bpfpoly0", "bpfpoly1"
        before_ids = program_status("local", "packet-classifier")["programIds"]
        self.assertEqual(len(xdp_progs(dev_in)), 1)
        gen = kubectl_json("get", "bpp", "packet-classifier")["metadata"]["generation"]
        stop = threading.Event()
        sent = [0]

        def traffic():
            while not stop.is_set():
                send(dev_out, 17, 20)
                sent[0] += 20
                time.sleep(0.01)

        m0 = metric(metrics(), "bpfpoly_dispatch_total", program="packet-classifier", key="17") or 0
        t = threading.Thread(target=traffic)
        t.start()
        samples, attach_counts = [], []
        try:
            sh("kubectl", "patch", "bpp", "packet-classifier", "--type=json", "-p",
               '[{"op":"replace","path":"/spec/config/1/value","value":"false"}]')

            def updated():
                samples.append(metric(metrics(), "bpfpoly_dispatch_total", program="packet-classifier", key="17") or 0)
                attach_counts.append(len(xdp_progs(dev_in)))
                s = program_status("local", "packet-classifier")
                return s["observedGeneration"] == gen + 1 and s["programIds"] != before_ids and s

            s = wait("the update on local", updated, timeout=60)
            time.sleep(1)
            samples.append(metric(metrics(), "bpfpoly_dispatch_total", program="packet-classifier", key="17") or 0)
            attach_counts.append(len(xdp_progs(dev_in)))
        finally:
            stop.set()
            t.join()
        self.assertEqual(s["phase"], "Loaded")
        self.assertTrue(all(n == 1 for n in attach_counts), f"XDP attach count must stay one: {attach_counts}")
        self.assertGreater(samples[-1], m0, "frames kept being counted through the update")
        self.assertEqual(samples, sorted(samples), f"counts never went backwards: {samples}")
        self.assertTrue(set(before_ids).isdisjoint(bpftool_prog_ids()), "the old version was unloaded")
        # Restore the sample for the next run.
        sh("kubectl", "apply", "-f", os.path.join(REPO, "crds", "examples", "packet-classifier.yaml"))

    def test_6_delete_runs_the_finalizer_and_leaves_nothing(self):
        s = program_status("local", "rejected-variant")
        ids = set(s["programIds"])
        self.assertTrue(os.path.isdir(os.path.join(BPFFS, "rejected-variant")))
        sh("kubectl", "delete", "bpp", "rejected-variant", "--wait=true", "--timeout=60s")
        self.assertTrue(ids.isdisjoint(bpftool_prog_ids()), "programs gone from the kernel")
        self.assertTrue(ids.isdisjoint(bpftool_link_prog_ids()), "links gone")
        self.assertFalse(os.path.exists(os.path.join(BPFFS, "rejected-variant")), "pins gone")
        self.assertEqual(xdp_progs("bpfpoly2"), [], "nothing attached to bpfpoly2")
        for node in ["local", OLD_NODE]:
            left = program_status(node, "rejected-variant")
            self.assertTrue(left is None or left["phase"] == "Unloaded", f"{node}: {left}")
        # Put the sample back for the next run.
        sh("kubectl", "apply", "-f", os.path.join(REPO, "crds", "examples", "rejected-variant.yaml"))


if __name__ == "__main__":
    unittest.main(verbosity=2)
