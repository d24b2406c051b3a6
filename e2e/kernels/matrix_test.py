"""The kernel matrix: every sample in crds/examples/ on every real kernel, asserted per kernel.

Runs against the stack `BPFPOLY_KERNELS="5.10 6.1 6.12 7.2" e2e/run.sh run` starts (matrix.sh):
node `local` (this host's kernel) and one node per Debian kernel, each a qemu microVM whose
own bpfpoly-agent loads into that kernel. Nothing here is simulated.

For each node and program it reads the agent's status and the operator's assignment and
checks them against EXPECTED, exactly: phase, variant, dispatch mechanism, how the tc/xdp
hooks attached, every variant fallback with its stage, and the config fields that fell
back. Any difference fails the run. It also checks, on each Debian kernel:
  - the profile is that kernel's (release, BTF sha256 and type count of the BTF extracted
    from its vmlinuz) and its BTF answers equal bpftool's reading of that BTF;
  - real frames through the veth pair inside the guest are counted per dispatch key under
    freplace (packet-classifier), and the kprobe variant of exec-tracer runs on real execs;
  - the verifier-stage fallback of comm-stats carries that kernel's verifier log.
Writes target/kernels/matrix.json and prints the table (README "Tested kernels").
"""

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
    for n in nodes:
        st = {s["name"]: s for s in states.get(n, {}).get("status", {}).get("programs", [])}
        for p in programs:
            if st.get(p, {}).get("phase") not in FINAL:
                return f"{n}/{p}: {st.get(p, {}).get('phase', 'no status')}"
    return None


def collect(kernels, programs):
    states = {o["metadata"]["name"]: o for o in kubectl_json("get", "bns")["items"]}
    rows = []
    for k in kernels:
        node = node_of(k)
        spec = {a["name"]: a for a in states[node].get("spec", {}).get("programs", [])}
        status = {s["name"]: s for s in states[node]["status"]["programs"]}
        for p in programs:
            s, a = status[p], spec.get(p, {})
            rows.append({
                "kernel": k, "node": node, "program": p,
                "phase": s["phase"], "variant": s.get("variant"), "mechanism": s.get("mechanism"),
                "attach": attach_of(s.get("message", "")),
                "fallbacks": [{"from": f["from"], "to": f["to"], "stage": f["stage"],
                               "reason": f.get("reason", ""),
                               "verifierLog": (f.get("verifierLog") or "")[-600:]}
                              for f in s.get("fallbacks", [])],
                "configFallbacks": [{"field": c["name"], "value": c["value"], "reason": c.get("reason")}
                                    for c in a.get("config", []) if c.get("fellBack")],
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


def bpftool_answers(btf_path, queries):
    """Answers `type:`, `field:`, `enum:` and `func:` queries from bpftool's dump of btf_path."""
    out = subprocess.run(["bpftool", "btf", "dump", "file", btf_path], capture_output=True,
                         text=True, check=True).stdout
    kinds = {"struct": "STRUCT", "union": "UNION", "enum": "ENUM"}
    types, members, enumvals, funcs = set(), {}, {}, set()
    current = None
    for line in out.splitlines():
        m = re.match(r"^\[\d+\] (STRUCT|UNION|ENUM|ENUM64|FUNC) '([^']*)'", line)
        if m:
            kind = "ENUM" if m.group(1) == "ENUM64" else m.group(1)
            current = (kind, m.group(2))
            if kind == "FUNC":
                funcs.add(m.group(2))
                current = None
            else:
                types.add(current)
            continue
        if line.startswith("["):
            current = None
            continue
        m = re.match(r"^\s+'([^']*)'", line)
        if m and current:
            (members if current[0] != "ENUM" else enumvals).setdefault(current, set()).add(m.group(1))
    answers = {}
    for q in queries:
        kind, _, rest = q.partition(":")
        if kind == "type":
            k, _, name = rest.partition(" ")
            answers[q] = (kinds.get(k), name) in types
        elif kind == "field":
            t, _, field = rest.rpartition(".")
            k, _, name = t.partition(" ")
            answers[q] = field in members.get((kinds.get(k), name), set())
        elif kind == "enum":
            t, _, val = rest.rpartition(".")
            k, _, name = t.partition(" ")
            answers[q] = val in enumvals.get(("ENUM", name), set())
        elif kind == "func":
            answers[q] = rest in funcs
    return answers


def check_profiles(kernels):
    problems = []
    for k in kernels:
        if k == "host":
            continue
        node = node_of(k)
        bnp = kubectl_json("get", "bnp", node)["status"]
        cache = os.path.join(CACHE, "kernels", k)
        release = open(os.path.join(cache, "release")).read().strip()
        btf = os.path.join(cache, "vmlinux.btf")
        sha = hashlib.sha256(open(btf, "rb").read()).hexdigest()
        types = int(open(os.path.join(cache, "btf-types")).read())
        if bnp["kernel"]["release"] != release:
            problems.append(f"{k}: profile release {bnp['kernel']['release']}, the package's is {release}")
        if bnp["btf"].get("sha256") != sha:
            problems.append(f"{k}: profile BTF sha256 {bnp['btf'].get('sha256')} is not that of the BTF in its vmlinuz ({sha})")
        if bnp["btf"].get("types") not in (types, types - 1):  # bpftool counts from id 1; the void type is id 0
            problems.append(f"{k}: profile has {bnp['btf'].get('types')} BTF types, bpftool reads {types}")
        answers = bnp.get("answers", {})
        ours = {q: v for q, v in answers.items() if q.split(":")[0] in ("type", "field", "enum", "func")}
        if not ours:
            problems.append(f"{k}: the profile answers no BTF query")
        ref = bpftool_answers(btf, ours)
        for q, v in sorted(ours.items()):
            if ref[q] != v:
                problems.append(f"{k}: profile answers {q} = {v}, bpftool's reading of its BTF says {ref[q]}")
        for t in ("kprobe", "tracing", "ext"):
            if t not in bnp.get("programTypes", []):
                problems.append(f"{k}: program type {t} not probed as supported ({bnp.get('programTypes')})")
    return problems


def check_traffic(kernels):
    """Frames sent inside each guest (guest-init's traffic loop) through its veth pair are
    counted per key under freplace; the kprobe exec-tracer runs on real execs."""
    problems = []
    debian_kernels = [k for k in kernels if k != "host"]
    before = {k: metrics(k) for k in debian_kernels}
    time.sleep(8)
    for k in debian_kernels:
        after = metrics(k)
        for key in ("6", "17", "1"):
            a = metric(before[k], "bpfpoly_dispatch_total", program="packet-classifier", key=key) or 0
            b = metric(after, "bpfpoly_dispatch_total", program="packet-classifier", key=key) or 0
            if b <= a:
                problems.append(f"{k}: packet-classifier key {key} counted {a} -> {b} frames in 8 s (guest traffic every 2 s)")
        a = metric(before[k], "bpfpoly_prog_runs_total", program="exec-tracer") or 0
        b = metric(after, "bpfpoly_prog_runs_total", program="exec-tracer") or 0
        if b <= a:
            problems.append(f"{k}: exec-tracer (kprobe) ran {a} -> {b} times in 8 s of execs")
    return problems


def check_verifier_logs(rows):
    problems = []
    for r in rows:
        for f in r["fallbacks"]:
            if f["stage"] == "verify" and not f["verifierLog"].strip():
                problems.append(f"{r['kernel']}/{r['program']}: verify fallback {f['from']} without a verifier log")
            # 5.10 knows neither the helper nor a callback subprogram (BPF_PSEUDO_FUNC): it
            # stops at the callback, before it reaches the call.
            if r["program"] == "comm-stats" and f["stage"] == "verify" and not any(
                    w in f["verifierLog"] for w in ("unknown#181", "bpf_loop", "func_info doesn't match number of subprogs")):
                problems.append(f"{r['kernel']}/comm-stats: the verifier log is not about bpf_loop: {f['verifierLog'][-200:]!r}")
    return problems


def table(rows, kernels, programs):
    def cell(r):
        s = f"{r['variant'] or '-'}"
        extra = []
        if r["mechanism"]:
            extra.append(r["mechanism"])
        if r["attach"] and ("netlink" in r["attach"]):
            extra.append("legacy tc")
        elif r["attach"] and r["attach"].startswith("tc "):
            extra.append("tcx")
        s += f" ({', '.join(extra)})" if extra else ""
        s += f" {r['phase']}"
        for f in r["fallbacks"]:
            s += f"; {f['from']}→{f['to']} @{f['stage']}"
        for c in r["configFallbacks"]:
            s += f"; {c['field']}={c['value']}"
        return s
    by = {(r["kernel"], r["program"]): r for r in rows}
    header = "| kernel | " + " | ".join(programs) + " |"
    lines = [header, "|" + "---|" * (len(programs) + 1)]
    for k in kernels:
        release = by[(k, programs[0])]["release"]
        lines.append(f"| {k} ({release}) | " + " | ".join(cell(by[(k, p)]) for p in programs) + " |")
    return "\n".join(lines)


def main():
    kernels = KERNELS + ["host"]
    unknown = [k for k in KERNELS if k not in EXPECTED]
    if unknown:
        sys.exit(f"no expectations for kernels {unknown}")
    nodes = [node_of(k) for k in kernels]
    programs = samples()
    t0 = time.time()
    last = None
    while time.time() - t0 < SETTLE_TIMEOUT:
        last = settled(nodes, programs)
        if last is None:
            break
        time.sleep(2)
    else:
        sys.exit(f"matrix: not settled after {SETTLE_TIMEOUT} s: {last}")
    print(f"[bpfpoly] matrix: {len(programs)} programs settled on {len(nodes)} nodes in {time.time() - t0:.0f} s")
    rows = collect(kernels, programs)
    profiles = {n: kubectl_json("get", "bnp", n)["status"] for n in nodes}
    for r in rows:
        r["release"] = profiles[r["node"]]["kernel"]["release"]
    problems = compare(rows) + check_verifier_logs(rows) + check_profiles(kernels) + check_traffic(kernels)
    report = {
        "generatedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "kernels": [{"kernel": k, "node": node_of(k), "release": profiles[node_of(k)]["kernel"]["release"],
                     "btfTypes": profiles[node_of(k)]["btf"].get("types"),
                     "programTypes": profiles[node_of(k)].get("programTypes"),
                     "where": "this host" if k == "host" else "qemu TCG microVM"} for k in kernels],
        "results": rows,
        "problems": problems,
    }
    out_dir = os.path.join(TARGET, "kernels")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "matrix.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(table(rows, kernels, programs))
    print(f"[bpfpoly] matrix: wrote {os.path.join(out_dir, 'matrix.json')}")
    if problems:
        print(f"[bpfpoly] matrix: {len(problems)} difference(s) from what this test expects:")
        for p in problems:
            print("  - " + p)
        sys.exit(1)
    print(f"[bpfpoly] matrix: every kernel did what it must ({len(rows)} results)")


if __name__ == "__main__":
    main()
