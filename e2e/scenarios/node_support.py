"""What the node scenario (node_test.py) uses: the chart values and program manifests, and
helpers for kubectl, Pods, metrics, frames on the veths, bpftool, the operator's Lease and
Prometheus's discovery."""


import json
import os
import socket
import struct
import subprocess
import threading
import time
import unittest
import urllib.parse
import urllib.request

import helm_python as helm
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHART = os.path.join(REPO, "charts", "bpfpoly")
KUBECONFIG = os.environ["KUBECONFIG"]
NS = "bpfpoly-system"
RELEASE = "bpfpoly"
TAG1 = os.environ.get("BPFPOLY_NODE_TAG1", "node-a")
TAG2 = os.environ.get("BPFPOLY_NODE_TAG2", "node-b")
AGENT_PORT = int(os.environ.get("BPFPOLY_NODE_METRICS_PORT", "28464"))
BPFFS = os.environ.get("BPFPOLY_NODE_BPFFS", "/sys/fs/bpf/bpfpoly-node")
AGENT_METRICS = f"http://127.0.0.1:{AGENT_PORT}/metrics"
PROM_PORT = int(os.environ.get("BPFPOLY_NODE_PROMETHEUS_PORT", "28090"))
PROM_DIR = os.path.join(REPO, ".run", "node", "prometheus")
NODE = "local"
# Two veth pairs: programs attach to bpn0 and bpn2, frames are sent from bpn1 and bpn3.
VETHS = [("bpn0", "bpn1"), ("bpn2", "bpn3")]
VAR_LIB = "/var/lib/bpfpoly"


CAP_BITS = {"NET_ADMIN": 12, "SYS_ADMIN": 21, "SYS_RESOURCE": 24, "PERFMON": 38, "BPF": 39}


def host_bounding_set() -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("CapBnd:")).split()[1], 16)


# The capabilities mode asks for what this host can grant: runc refuses a container whose
# capabilities are not all in the host's bounding set, and some machines (this VM among them)
# run root without CAP_SYS_RESOURCE, which only kernels before 5.11 need for BPF maps.
AGENT_CAPS = [c for c in ("BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN", "SYS_RESOURCE")
              if host_bounding_set() & (1 << CAP_BITS[c])]


def values(tag: str, mode: str) -> dict:
    agent = {"securityMode": mode, "metricsPort": AGENT_PORT, "bpffsRoot": BPFFS}
    if mode == "capabilities":
        agent["capabilities"] = AGENT_CAPS
    return {
        "image": {"repository": "bpfpoly/bpfpoly", "tag": tag, "pullPolicy": "Never"},
        "operator": {"leaderElection": {"leaseSeconds": 10}},
        "agent": agent,
    }


def program(name: str, dev: str) -> str:
    return f"""
apiVersion: bpfpoly.io/v1alpha1
kind: BpfPolyProgram
metadata: {{name: {name}}}
spec:
  nodeSelector: {{matchLabels: {{kubernetes.io/hostname: {NODE}}}}}
  variants:
  - name: xdp-tailcall
    bytecode: {{builtin: packet-classifier-xdp}}
    dispatchMechanism: tailCall
    programs:
    - name: classify
      attach: {{xdp: {{interfaces: [{dev}], mode: skb}}}}
    - {{name: handle_tcp}}
    - {{name: handle_udp}}
    - {{name: handle_icmp}}
  dispatch:
    entry: classify
    table: jump_table
    slots:
    - {{key: 6, handler: handle_tcp}}
    - {{key: 17, handler: handle_udp}}
    - {{key: 1, handler: handle_icmp}}
"""


# --- helpers ---------------------------------------------------------------------------

def sh(*args, check=True, stdin=None, timeout=120):
    p = subprocess.run(args, capture_output=True, text=True, input=stdin, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({p.returncode}): {p.stderr.strip()}")
    return p.stdout


def kubectl(*args, **kw):
    return sh("kubectl", "--kubeconfig", KUBECONFIG, *args, **kw)


def kjson(*args):
    return json.loads(kubectl(*args, "-o", "json"))


def pods(component: str | None = None) -> list[dict]:
    sel = "app.kubernetes.io/instance=" + RELEASE
    if component:
        sel += ",app.kubernetes.io/component=" + component
    return [p for p in kjson("get", "pods", "-n", NS, "-l", sel)["items"]
            if not p["metadata"].get("deletionTimestamp")]


def pod_ready(p: dict) -> bool:
    return p["status"].get("phase") == "Running" and any(
        c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))


def pod_report() -> str:
    """Every Pod of the release that is not Ready, by name, with its state, Events and logs."""
    out = []
    try:
        items = kjson("get", "pods", "-n", NS)["items"]
    except AssertionError as e:
        return f"\n(cannot list Pods: {e})"
    for p in items:
        name = p["metadata"]["name"]
        cs = p["status"].get("containerStatuses", [])
        state = ", ".join(f"{c['name']}: ready={c['ready']} restarts={c['restartCount']} "
                          f"state={list(c.get('state', {}))}" for c in cs) or p["status"].get("phase")
        out.append(f"\n--- Pod {NS}/{name} ({'Ready' if pod_ready(p) else 'NOT Ready'}; {state})")
        if pod_ready(p) and not os.environ.get("BPFPOLY_NODE_ALL_LOGS"):
            out.append(kubectl("logs", "-n", NS, name, "--tail", "15", check=False))
            continue
        ev = kubectl("get", "events", "-n", NS, "--field-selector", f"involvedObject.name={name}", check=False)
        out.append(ev)
        out.append(kubectl("logs", "-n", NS, name, "--all-containers", "--tail", "60", check=False))
        if any(c["restartCount"] for c in cs):
            out.append("(previous container)\n" + kubectl("logs", "-n", NS, name, "--previous", "--tail", "40",
                                                           check=False))
    return "".join(out)


def wait(what, fn, timeout=120, interval=0.5):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            last = fn()
            if last:
                return last
        except (AssertionError, KeyError, IndexError, subprocess.SubprocessError, OSError, ValueError) as e:
            last = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def metrics_text(url=AGENT_METRICS) -> str:
    with urllib.request.urlopen(url, timeout=3) as r:
        return r.read().decode()


def metric(text, name, **labels):
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, val = line.rpartition(" ")
        lname, _, rest = head.partition("{")
        if lname != name:
            continue
        got = {}
        for kv in rest.rstrip("}").split(","):
            if "=" in kv:
                k, v = kv.split("=", 1)
                got[k] = v.strip('"')
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(val)
            found = True
    return total if found else None


def udp_count(prog: str):
    try:
        return metric(metrics_text(), "bpfpoly_dispatch_total", program=prog, key="17")
    except OSError:
        return None  # the agent is restarting


def frame(proto=17, payload=b"x" * 32):
    eth = b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + struct.pack("!H", 0x0800)
    l4 = struct.pack("!HHHH", 1234, 53, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0, 64, proto, 0,
                     socket.inet_aton("10.99.0.1"), socket.inet_aton("10.99.0.2"))
    return eth + ip + l4


def send(dev, n):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((dev, 0))
    f = frame()
    for _ in range(n):
        s.send(f)
    s.close()


class Traffic:
    """UDP frames on `dev` in the background, 10 every 20 ms, counted; every 10th round it
    notes the id of the XDP program attached to `watch`."""

    def __init__(self, dev, watch):
        self.dev, self.watch, self.sent, self.stop = dev, watch, 0, threading.Event()
        self.attached: set = set()
        self.t = threading.Thread(target=self.run, daemon=True)

    def run(self):
        i = 0
        while not self.stop.is_set():
            send(self.dev, 10)
            self.sent += 10
            if i % 10 == 0:
                self.attached.add(xdp_prog(self.watch))
            i += 1
            time.sleep(0.02)

    def __enter__(self):
        self.t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.t.join()


def bpftool_ids(kind: str) -> set[int]:
    key = "prog_id" if kind == "link" else "id"
    return {o.get(key) for o in json.loads(sh("bpftool", "-j", kind, "show"))}


def xdp_prog(dev: str):
    for entry in json.loads(sh("bpftool", "-j", "net", "show", "dev", dev)):
        for x in entry.get("xdp", []):
            return x.get("id")
    return None


def node_program(name: str):
    st = kjson("get", "bns", NODE)
    return next((p for p in st.get("status", {}).get("programs", []) if p["name"] == name), None)


def loaded(name: str):
    p = node_program(name)
    return p if p and p.get("phase") == "Loaded" and p.get("programIds") else None


def agent_processes() -> list[tuple[int, str]]:
    """(pid, cgroup) of every bpfpoly-agent process on this machine using our bpffs root."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
            if not cmd or not cmd[0].endswith(b"bpfpoly-agent") or f"--bpffs-root={BPFFS}".encode() not in cmd:
                continue
            with open(f"/proc/{pid}/cgroup") as f:
                out.append((int(pid), f.read()))
        except OSError:
            continue
    return out


def lease_holder() -> str:
    return kjson("get", "lease", "-n", NS, "bpfpoly-operator")["spec"].get("holderIdentity", "")


def discovered_pods(path: str) -> None:
    """Debian's Prometheus 2.42 is built without Kubernetes service discovery, so the Pods are
    discovered here instead, and that part alone is simulated: each container port of each Pod
    in the release namespace becomes a file_sd target carrying exactly the
    __meta_kubernetes_pod_* labels Kubernetes discovery (role: pod) would give it, read from
    the API server. Prometheus scrapes the real Pods at their real addresses."""
    groups = []
    for p in kjson("get", "pods", "-n", NS)["items"]:
        if p["status"].get("phase") != "Running" or not p["status"].get("podIP") or \
                p["metadata"].get("deletionTimestamp"):
            continue
        md = p["metadata"]
        for c in p["spec"]["containers"]:
            for port in c.get("ports", []):
                labels = {
                    "__meta_kubernetes_namespace": md["namespace"],
                    "__meta_kubernetes_pod_name": md["name"],
                    "__meta_kubernetes_pod_ip": p["status"]["podIP"],
                    "__meta_kubernetes_pod_node_name": p["spec"].get("nodeName", ""),
                    "__meta_kubernetes_pod_container_name": c["name"],
                    "__meta_kubernetes_pod_container_port_name": port.get("name", ""),
                    "__meta_kubernetes_pod_container_port_number": str(port["containerPort"]),
                }
                for k, v in md.get("labels", {}).items():
                    labels["__meta_kubernetes_pod_label_" + "".join(ch if ch.isalnum() else "_" for ch in k)] = v
                groups.append({"targets": [f"{p['status']['podIP']}:{port['containerPort']}"], "labels": labels})
    with open(path + ".tmp", "w") as f:
        json.dump(groups, f)
    os.replace(path + ".tmp", path)


def podmonitor_scrape_config(sd_file: str) -> dict:
    """A Prometheus scrape config that does what the Prometheus Operator makes of the chart's
    PodMonitor: pod discovery in the release namespace (see discovered_pods), the PodMonitor's
    selector and port, its jobLabel, the operator's standard target labels, then the
    PodMonitor's own relabelings, taken from the chart as rendered (not copied by hand)."""
    rendered = helm.Chart.load(CHART).render({"metrics": {"podMonitor": {"enabled": True}}},
                                             name=RELEASE, namespace=NS)
    pm = yaml.safe_load(rendered["bpfpoly/templates/podmonitor.yaml"])
    spec = pm["spec"]
    ep = spec["podMetricsEndpoints"][0]
    sel = spec["selector"]

    def lbl(k):
        return "__meta_kubernetes_pod_label_" + "".join(c if c.isalnum() else "_" for c in k)

    relabel = []
    for k, v in sel["matchLabels"].items():
        relabel.append({"source_labels": [lbl(k)], "regex": v, "action": "keep"})
    for e in sel.get("matchExpressions", []):
        assert e["operator"] == "In", e
        relabel.append({"source_labels": [lbl(e["key"])], "regex": "|".join(e["values"]), "action": "keep"})
    relabel += [
        {"source_labels": ["__meta_kubernetes_pod_container_port_name"], "regex": ep["port"], "action": "keep"},
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
        {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
        {"target_label": "endpoint", "replacement": ep["port"]},
        {"source_labels": [lbl(spec["jobLabel"])], "target_label": "job"},
    ]
    for r in ep.get("relabelings", []):
        out = {"source_labels": r["sourceLabels"]} if "sourceLabels" in r else {}
        for k_in, k_out in (("targetLabel", "target_label"), ("regex", "regex"), ("replacement", "replacement"),
                            ("action", "action"), ("separator", "separator")):
            if k_in in r:
                out[k_out] = r[k_in]
        relabel.append(out)
    return {
        "job_name": f"podMonitor/{NS}/{pm['metadata']['name']}",
        "metrics_path": ep["path"],
        "scrape_interval": "1s", "scrape_timeout": "1s",
        "file_sd_configs": [{"files": [sd_file], "refresh_interval": "1s"}],
        "relabel_configs": relabel,
    }


def prom_query(q: str) -> list:
    url = f"http://127.0.0.1:{PROM_PORT}/api/v1/query?" + urllib.parse.urlencode({"query": q})
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)["data"]["result"]


def helm_cfg():
    return helm.Config(kubeconfig_path=KUBECONFIG, namespace=NS)
