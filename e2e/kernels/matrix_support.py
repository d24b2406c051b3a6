"""The kernel matrix's expectations (EXPECTED: per kernel and program, exactly) and the
helpers matrix_test.py and matrix_checks.py share: reading the nodes' status and metrics,
collecting and comparing rows, kubectl and waiting."""

import hashlib
import json
import os
import re
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
TARGET = os.environ.get("CARGO_TARGET_DIR") or os.path.join(REPO, "target")
CACHE = os.environ.get("BPFPOLY_CACHE") or os.path.expanduser("~/.cache/bpfpoly")
KERNELS = os.environ.get("BPFPOLY_KERNELS", "5.10 6.1 6.12 7.2").split()
VM_METRICS_BASE = int(os.environ.get("BPFPOLY_VM_METRICS_BASE", "9470"))
# The operator's --node-lost-after (run.sh starts it with the default) and the agents'
# --lease-renew-interval (default): the bound within which a powered-off node stops counting.
NODE_LOST_AFTER = int(os.environ.get("BPFPOLY_NODE_LOST_AFTER", "20"))
LEASE_RENEW = int(os.environ.get("BPFPOLY_LEASE_RENEW_INTERVAL", "5"))
# The kernel whose VM is powered off and booted again (the fastest to boot).
LOSS_KERNEL = os.environ.get("BPFPOLY_MATRIX_LOSS_KERNEL", "5.10")
SETTLE_TIMEOUT = int(os.environ.get("BPFPOLY_MATRIX_TIMEOUT", "300"))
ALL_KERNELS = [l.split()[0] for l in open(os.path.join(HERE, "kernels.list"))
               if l.strip() and not l.startswith("#")]

# What each kernel must do with each sample. Per (kernel, program):
#   phase, variant, mechanism (dispatch, None without one), attach (how the hooks attached,
#   from the agent's message), fallbacks [(from, to, stage)], config fields that fell back.
# This host has no CONFIG_KPROBES; 5.10 has kprobes, but attaches them (like tracepoints)
# through perf events without a bpf_link (perf-event links came in 5.15), and the agent only
# runs what it can pin. Both fall back at the attach stage, with different reasons.
NO_KPROBES = [("kprobe", "tp-btf", "attach")]
REJECTED = [("unchecked-read", "xdp-default-path", "verify")]
NO_BPF_LOOP = [("bpf-loop", "bounded-loop", "verify")]
LEGACY_TC = "tc (netlink) bpfpoly1 (ingress)"  # no TCX before 6.6


def debian(perf_link=True, tcx=True, bpf_loop=True):
    return {
        "exec-tracer": (
            ("Loaded", "kprobe", None, "kprobe finalize_exec", [], []) if perf_link else
            ("Degraded", "tp-btf", None, "tpBtf sched_process_exec", NO_KPROBES, [])),
        "packet-classifier": ("Loaded", "xdp-freplace", "freplace", "xdp bpfpoly0 (skb)", [], []),
        "classifier-config-fallback": (
            ("Loaded", "xdp-modern", "tailCall", "xdp bpfpoly1 (skb)", [], []) if tcx else
            ("Loaded", "tc-legacy", "tailCall", LEGACY_TC, [], ["count_bytes"])),
        "rejected-variant": ("Degraded", "xdp-default-path", None, "xdp bpfpoly2 (skb)", REJECTED, []),
        "comm-stats": (
            ("Loaded", "bpf-loop", None, "rawTracepoint sched_process_exec", [], []) if bpf_loop else
            ("Degraded", "bounded-loop", None, "rawTracepoint sched_process_exec", NO_BPF_LOOP, [])),
    }


EXPECTED = {
    # Debian 11: no TCX (6.6), no struct bpf_iter_num (6.4), no bpf_loop (5.17), no
    # perf-event links (5.15).
    "5.10": debian(perf_link=False, tcx=False, bpf_loop=False),
    # Debian 12: bpf_loop yes; TCX and open-coded iterators no.
    "6.1": debian(tcx=False),
    "6.12": debian(),
    "7.2": debian(),
    # This host (6.18 in a sandbox VM): no kprobes, no trampolines (no freplace/ext).
    "host": {
        "exec-tracer": ("Degraded", "tp-btf", None, "tpBtf sched_process_exec", NO_KPROBES, []),
        "packet-classifier": ("Loaded", "xdp-tailcall", "tailCall", "xdp bpfpoly0 (skb)", [], []),
        "classifier-config-fallback": ("Loaded", "xdp-modern", "tailCall", "xdp bpfpoly1 (skb)", [], []),
        "rejected-variant": ("Degraded", "xdp-default-path", None, "xdp bpfpoly2 (skb)", REJECTED, []),
        "comm-stats": ("Loaded", "bpf-loop", None, "rawTracepoint sched_process_exec", [], []),
    },
}
FINAL = {"Loaded", "Degraded", "Failed", "Unloaded"}
# This host's veth pairs may be renamed (run.sh: BPFPOLY_VETH_PREFIX, aliased for the agent).
VETH = os.environ.get("BPFPOLY_VETH_PREFIX", "bpfpoly")


def node_of(kernel):
    return "local" if kernel == "host" else "debian-" + kernel.replace(".", "-")


def kubectl_json(*args):
    p = subprocess.run(["kubectl", *args, "-o", "json"], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)}: {p.stderr.strip()}")
    return json.loads(p.stdout)


def samples():
    names = []
    for f in sorted(os.listdir(os.path.join(REPO, "crds", "examples"))):
        if f.endswith(".yaml"):
            m = re.search(r"^  name: (\S+)", open(os.path.join(REPO, "crds", "examples", f)).read(), re.M)
            names.append(m.group(1))
    return names


def metrics(kernel):
    port = VM_METRICS_BASE + ALL_KERNELS.index(kernel)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def metric(text, name, **labels):
    total, found = 0.0, False
    for line in text.splitlines():
        m = re.match(r'^([a-z_]+)(?:\{(.*)\})? ([0-9.e+-]+)$', line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'([a-z_]+)="([^"]*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
            found = True
    return total if found else None


def attach_of(message):
    m = re.search(r" on (.+?)(?:;|$)", message)
    return re.sub(rf"\b{re.escape(VETH)}(\d)\b", r"bpfpoly\1", m.group(1)) if m else None


def settled(nodes, programs):
    """Every program Ready at its generation, and every node reporting a final phase for it."""
    bpp = {o["metadata"]["name"]: o for o in kubectl_json("get", "bpp")["items"]}
    for p in programs:
        o = bpp.get(p)
        if not o:
            return f"{p}: not applied"
        ready = [c for c in o.get("status", {}).get("conditions", []) if c["type"] == "Ready"]
        if not ready or ready[0]["status"] != "True" or ready[0].get("observedGeneration") != o["metadata"]["generation"]:
            return f"{p}: not Ready ({ready[0].get('reason') if ready else 'no condition'})"
    states = {o["metadata"]["name"]: o for o in kubectl_json("get", "bns")["items"]}
    # A node state names the globals that fell back; the value written is the program's
    # fallback (assignments and programs are read at the same generation here: settled).
    fallback_of = {(o["metadata"]["name"], c["name"]): c.get("fallback")
                   for o in kubectl_json("get", "bpp")["items"] for c in o["spec"].get("config", [])}
    for n in nodes:
        st = {s["name"]: s for s in states.get(n, {}).get("status", {}).get("programs", [])}
        for p in programs:
            if st.get(p, {}).get("phase") not in FINAL:
                return f"{n}/{p}: {st.get(p, {}).get('phase', 'no status')}"
    return None


def collect(kernels, programs):
    states = {o["metadata"]["name"]: o for o in kubectl_json("get", "bns")["items"]}
    # A node state names the globals that fell back; the value written is the program's
    # fallback (assignments and programs are read at the same generation here: settled).
    fallback_of = {(o["metadata"]["name"], c["name"]): c.get("fallback")
                   for o in kubectl_json("get", "bpp")["items"] for c in o["spec"].get("config", [])}
    rows = []
    for k in kernels:
        node = node_of(k)
        # Fallbacks are stored once per node, each naming the programs it applies to.
        fell = {}
        for c in states[node].get("spec", {}).get("configFallbacks", []):
            for prog in c["programs"]:
                fell.setdefault(prog, []).append(c)
        status = {s["name"]: s for s in states[node]["status"]["programs"]}
        for p in programs:
            s = status[p]
            rows.append({
                "kernel": k, "node": node, "program": p,
                "phase": s["phase"], "variant": s.get("variant"), "mechanism": s.get("mechanism"),
                "attach": attach_of(s.get("message", "")),
                "fallbacks": [{"from": f["from"], "to": f["to"], "stage": f["stage"],
                               "reason": f.get("reason", ""),
                               "verifierLog": (f.get("verifierLog") or "")[-600:]}
                              for f in s.get("fallbacks", [])],
                "configFallbacks": [{"field": c["name"], "value": fallback_of.get((p, c["name"])),
                                     "reason": c.get("reason")}
                                    for c in fell.get(p, [])],
                "handlers": [{"key": h["key"], "state": h["state"]} for h in s.get("handlers", [])],
                "message": s.get("message", ""),
            })
    return rows


def compare(rows):
    problems = []
    for r in rows:
        want = EXPECTED[r["kernel"]].get(r["program"])
        if want is None:
            problems.append(f"{r['kernel']}/{r['program']}: no expectation in EXPECTED (add one)")
            continue
        got = (r["phase"], r["variant"], r["mechanism"], r["attach"],
               [(f["from"], f["to"], f["stage"]) for f in r["fallbacks"]],
               sorted(c["field"] for c in r["configFallbacks"]))
        want = (want[0], want[1], want[2], want[3], list(want[4]), sorted(want[5]))
        if got != want:
            problems.append(f"{r['kernel']}/{r['program']}:\n    want {want}\n    got  {got}\n    message: {r['message']}")
    return problems


def sh(*args, check=True, input=None):
    p = subprocess.run(list(args), capture_output=True, text=True, input=input)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {p.stderr.strip()}")
    return p


def program_status(node, program):
    st = kubectl_json("get", "bns", node).get("status", {})
    return next((s for s in st.get("programs", []) if s["name"] == program), None)


def wait_until(what, timeout, f, every=1.0):
    t0 = time.time()
    while True:
        v = f()
        if v:
            return v, time.time() - t0
        if time.time() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)
