"""The kernel matrix's checks beyond the status rows (run by matrix_test.py): profiles and
BTF answers against bpftool, real traffic per dispatch key, verifier logs, a rejected
freplace handler, a make-before-break config update, and node loss and reboot."""

import hashlib
import json
import os
import re
import subprocess
import sys
import time
import urllib.request


from matrix_support import *  # noqa: F401,F403

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


FREPLACE_BADHANDLER = """
apiVersion: bpfpoly.io/v1alpha1
kind: BpfPolyProgram
metadata: {name: matrix-freplace-badhandler}
spec:
  nodeSelector: {matchLabels: {bpfpoly.io/microvm: "true"}}
  variants:
  - name: xdp-freplace
    bytecode: {builtin: packet-classifier-xdp}
    handlerBytecode: {builtin: fallback-fixtures-badhandler-freplace}
    dispatchMechanism: freplace
    programs:
    - name: classify
      attach: {xdp: {interfaces: [bpfpoly4], mode: skb}}
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
  rollout: {maxUnavailable: "100%", canary: 0, pauseOnDegradedRatio: 1.0}
"""


def check_freplace_rejected_handler(kernels):
    """(a) Under freplace, the extension of slot 17 is refused by that kernel's verifier: the
    slot stays empty, UDP frames are counted on the default path, TCP and ICMP by their
    handlers. Real frames from the guest's traffic loop through bpfpoly5 -> bpfpoly4."""
    problems = []
    name = "matrix-freplace-badhandler"
    sh("kubectl", "apply", "-f", "-", input=FREPLACE_BADHANDLER)
    try:
        def loaded():
            got = {k: program_status(node_of(k), name) for k in kernels}
            return got if all(s and s.get("phase") in FINAL for s in got.values()) else None
        got, took = wait_until(f"{name} on {kernels}", 120, loaded)
        print(f"[bpfpoly] matrix: {name} settled on {len(kernels)} kernels in {took:.0f} s")
        before = {k: metrics(k) for k in kernels}
        time.sleep(8)
        for k in kernels:
            s = got[k]
            slots = {h["key"]: h for h in s.get("handlers", [])}
            if (s["phase"], s.get("mechanism")) != ("Degraded", "freplace"):
                problems.append(f"{k}/{name}: {s['phase']} with {s.get('mechanism')}, want Degraded with freplace: {s.get('message')}")
            if slots.get(17, {}).get("state") != "Empty" or "invalid access to packet" not in (slots.get(17, {}).get("reason") or "") + json.dumps(s.get("fallbacks")):
                problems.append(f"{k}/{name}: slot 17 not refused by the verifier: {slots.get(17)} {s.get('fallbacks')}")
            if any(slots.get(key, {}).get("state") != "Loaded" for key in (6, 1)):
                problems.append(f"{k}/{name}: slots 6 and 1 must be Loaded: {slots}")
            handler_fb = [f for f in s.get("fallbacks", []) if f["stage"] == "handler"]
            if [(f["from"], f["to"]) for f in handler_fb] != [("handle_udp", "default-path")]:
                problems.append(f"{k}/{name}: handler fallbacks {[(f['from'], f['to']) for f in handler_fb]}, want handle_udp -> default-path")
            after = metrics(k)

            def delta(metric_name, **labels):
                return (metric(after, metric_name, program=name, **labels) or 0) - (metric(before[k], metric_name, program=name, **labels) or 0)
            d_default, d_udp = delta("bpfpoly_dispatch_default_total"), delta("bpfpoly_dispatch_total", key="17")
            d_tcp, d_icmp = delta("bpfpoly_dispatch_total", key="6"), delta("bpfpoly_dispatch_total", key="1")
            print(f"[bpfpoly] matrix: {k}: freplace with slot 17 refused, 8 s of traffic: default +{d_default:.0f}, "
                  f"udp(17) +{d_udp:.0f}, tcp(6) +{d_tcp:.0f}, icmp(1) +{d_icmp:.0f}")
            if d_default <= 0 or d_udp != 0 or d_tcp <= 0 or d_icmp <= 0:
                problems.append(f"{k}/{name}: in 8 s default +{d_default}, key 17 +{d_udp} (want default > 0, key 17 = 0), key 6 +{d_tcp}, key 1 +{d_icmp} (want > 0)")
            if metric(after, "bpfpoly_handler_degraded", program=name, key="17") != 1:
                problems.append(f"{k}/{name}: bpfpoly_handler_degraded{{key=17}} is {metric(after, 'bpfpoly_handler_degraded', program=name, key='17')}, want 1")
    finally:
        sh("kubectl", "delete", "bpp", name, "--wait=true", "--timeout=90s", check=False)
    return problems


def check_freplace_update(kernels):
    """(b) A config update of packet-classifier (freplace on the Debian kernels) is
    make-before-break: each guest loads the new version (new program ids) while the old one
    keeps counting; no frame of a handled key is ever counted on the default path (a new
    entry attached before its slots were replaced would send them there), counters never go
    backwards, and every key keeps being counted with no gap longer than the traffic period
    allows."""
    problems = []
    name = "packet-classifier"
    bpp = kubectl_json("get", "bpp", name)
    gen = bpp["metadata"]["generation"]
    vlan = next(i for i, c in enumerate(bpp["spec"]["config"]) if c["name"] == "vlan_aware")
    value = "false" if bpp["spec"]["config"][vlan]["value"] == "true" else "true"
    before_ids = {k: set(program_status(node_of(k), name)["programIds"]) for k in kernels}
    keys = ("6", "17", "1")
    series = {k: [] for k in kernels}

    def sample():
        for k in kernels:
            try:
                m = metrics(k)
            except OSError:
                continue
            series[k].append((time.time(), {key: metric(m, "bpfpoly_dispatch_total", program=name, key=key) or 0 for key in keys},
                              metric(m, "bpfpoly_dispatch_default_total", program=name) or 0))
    for _ in range(3):
        sample()
        time.sleep(1)
    t_patch = time.time()
    sh("kubectl", "patch", "bpp", name, "--type=json", "-p", json.dumps([
        {"op": "replace", "path": f"/spec/config/{vlan}/value", "value": value},
        {"op": "replace", "path": "/spec/rollout", "value": {"maxUnavailable": "100%", "canary": 0}}]))

    def updated():
        sample()
        ss = {k: program_status(node_of(k), name) for k in kernels}
        return all(s["observedGeneration"] == gen + 1 and s["phase"] == "Loaded" and set(s["programIds"]) != before_ids[k]
                   for k, s in ss.items()) and ss
    ss, took = wait_until(f"{name} generation {gen + 1} on {kernels}", 180, updated, every=0.5)
    for _ in range(4):
        sample()
        time.sleep(1)
    print(f"[bpfpoly] matrix: {name} config update (vlan_aware={value}) loaded on {len(kernels)} kernels in {took:.0f} s")
    for k in kernels:
        s, pts = ss[k], series[k]
        if ss[k].get("mechanism") != "freplace":
            problems.append(f"{k}/{name}: updated with {s.get('mechanism')}, want freplace")
        if set(s["programIds"]) & before_ids[k]:
            problems.append(f"{k}/{name}: program ids {s['programIds']} share ids with the old version's {sorted(before_ids[k])}")
        defaults = [d for _, _, d in pts]
        if defaults and defaults[-1] != defaults[0]:
            problems.append(f"{k}/{name}: {defaults[-1] - defaults[0]:.0f} frames took the default path during the update (handled keys only are sent)")
        for key in keys:
            vals = [c[key] for _, c, _ in pts]
            if vals != sorted(vals):
                problems.append(f"{k}/{name}: key {key} counts went backwards: {vals}")
            if not vals or vals[-1] <= vals[0]:
                problems.append(f"{k}/{name}: key {key} not counted through the update: {vals}")
            # The longest stretch without a new frame of this key, around the update.
            last_change, longest, prev = pts[0][0] if pts else 0, 0.0, None
            for t, c, _ in pts:
                if prev is not None and c[key] > prev:
                    longest = max(longest, t - last_change)
                    last_change = t
                prev = c[key]
            longest = max(longest, (pts[-1][0] - last_change) if pts else 0)
            if longest > 4 * 2 + 2:
                problems.append(f"{k}/{name}: key {key} had no new frame for {longest:.1f} s around the update (traffic every 2 s)")
        print(f"[bpfpoly] matrix: {k}: update window {pts[0][0] - t_patch:+.0f}..{pts[-1][0] - t_patch:+.0f} s, {len(pts)} samples, "
              f"default path +{(defaults[-1] - defaults[0]) if defaults else 0:.0f}, counts " +
              ", ".join(f"{key}: {pts[0][1][key]:.0f}->{pts[-1][1][key]:.0f}" for key in keys))
    return problems


def program_views(programs):
    return {o["metadata"]["name"]: o for o in kubectl_json("get", "bpp")["items"] if o["metadata"]["name"] in programs}


def check_node_loss_and_reboot(kernel, programs, nodes_total):
    """Item 4 of #14: power a VM off abruptly (SIGKILL to its qemu), then boot it again."""
    problems, report = [], {"kernel": kernel, "nodeLostAfter": NODE_LOST_AFTER, "leaseRenewInterval": LEASE_RENEW}
    node = node_of(kernel)
    vm = os.path.join(HERE, "vm.sh")
    old = kubectl_json("get", "bns", node)["status"]
    old_status = {s["name"]: s for s in old["programs"]}
    old_metrics = metrics(kernel)
    lease = kubectl_json("get", "lease", "-n", "kube-node-lease", f"bpfpoly-agent-{node}")
    old_boot = lease["metadata"]["annotations"].get("bpfpoly.io/boot-id")
    if old.get("bootId") != old_boot:
        problems.append(f"{kernel}: status boot {old.get('bootId')} is not its Lease's {old_boot}")
    t_kill = time.time()
    sh("bash", vm, "kill", kernel)
    print(f"[bpfpoly] matrix: node loss: {kernel} powered off (SIGKILL to qemu); bound {NODE_LOST_AFTER} s "
          f"(--node-lost-after) + {LEASE_RENEW} s (renewal interval)")
    claims = []

    def lost_everywhere():
        views = program_views(programs)
        t = time.time() - t_kill
        out = {}
        for p, o in views.items():
            st = o.get("status", {})
            n = st.get("nodes", {})
            sample = next((s for s in st.get("samples", []) if s["node"] == node and s["phase"] == "Lost"), None)
            counted = n.get("loaded", 0) + n.get("degraded", 0)
            claims.append((t, p, counted, n.get("lost", 0)))
            if not sample or n.get("lost") != 1:
                return None
            out[p] = (st, sample)
        return out
    views, took = wait_until(f"every program to stop counting {node}", NODE_LOST_AFTER + LEASE_RENEW + 60, lost_everywhere, every=0.5)
    report["lostAfterSeconds"] = round(took, 1)
    print(f"[bpfpoly] matrix: node loss: every program stopped counting {node} {took:.1f} s after the power-off")
    if not (NODE_LOST_AFTER - LEASE_RENEW <= took <= NODE_LOST_AFTER + LEASE_RENEW + 3):
        problems.append(f"{kernel}: lost {took:.1f} s after the power-off, outside [{NODE_LOST_AFTER - LEASE_RENEW}, {NODE_LOST_AFTER + LEASE_RENEW + 3}] s")
    for p, (st, sample) in views.items():
        n = st["nodes"]
        ready = next(c for c in st["conditions"] if c["type"] == "Ready")
        for part in ("agent silent since", f"Lease kube-node-lease/bpfpoly-agent-{node} not renewed for",
                     f"--node-lost-after {NODE_LOST_AFTER} s", "last reported "):
            if part not in sample["reason"]:
                problems.append(f"{kernel}/{p}: the Lost sample does not say {part!r}: {sample['reason']}")
        if (ready["status"], ready["reason"]) != ("False", "NodesLost") or node not in ready["message"]:
            problems.append(f"{kernel}/{p}: Ready {ready['status']} {ready['reason']}: {ready['message']}")
        if n["loaded"] + n["degraded"] > nodes_total - 1:
            problems.append(f"{kernel}/{p}: still counted: {n}")
    report["lostSample"] = next(iter(views.values()))[1]["reason"]
    events = kubectl_json("get", "events.events.k8s.io", "-n", "default")["items"]
    lost_events = {e["regarding"]["name"] for e in events if e.get("reason") == "NodeLost" and (e.get("note") or "").startswith(f"node {node}:")}
    if set(programs) - lost_events:
        problems.append(f"{kernel}: no NodeLost Event for {sorted(set(programs) - lost_events)}")
    # Once lost, no poll may count it again while it is down.
    t_lost = took
    late = [(round(t, 1), p, c) for t, p, c, lost in claims if t > t_lost and lost != 1]
    if late:
        problems.append(f"{kernel}: counted again while powered off: {late[:5]}")

    t_boot = time.time()
    sh("bash", vm, "start", kernel)
    sh("bash", vm, "wait", kernel)
    agent_ready = time.time() - t_boot
    # Programs stay unloaded on the fresh kernel until its agent reports them.
    seen_pending = set()

    def fresh():
        st = kubectl_json("get", "bns", node).get("status", {})
        views = program_views(programs)
        for p, o in views.items():
            if any(s["node"] == node and s["phase"] == "Pending" and "booted again" in s["reason"]
                   for s in o.get("status", {}).get("samples", [])):
                seen_pending.add(p)
        if st.get("bootId") in (None, old_boot):
            return None
        by = {s["name"]: s for s in st.get("programs", [])}
        if any(by.get(p, {}).get("phase") not in ("Loaded", "Degraded") for p in programs):
            return None
        for p, o in views.items():
            ready = next((c for c in o.get("status", {}).get("conditions", []) if c["type"] == "Ready"), {})
            if ready.get("status") != "True" or o["status"]["nodes"].get("lost"):
                return None
        return st
    st, took = wait_until(f"{node} loaded afresh and every program Ready", 240, fresh)
    report["agentReadyAfterBootSeconds"] = round(agent_ready, 1)
    report["readyAgainAfterBootSeconds"] = round(time.time() - t_boot, 1)
    report["staleReportShownAsPendingFor"] = sorted(seen_pending)
    print(f"[bpfpoly] matrix: reboot: {kernel}'s agent ready {agent_ready:.0f} s after qemu started; "
          f"every program Ready with it again after {time.time() - t_boot:.0f} s (boot {old_boot} -> {st['bootId']})")
    new_metrics = metrics(kernel)
    loads = metric(new_metrics, "bpfpoly_load_duration_seconds_count") or 0
    report["loadsAfterReboot"] = loads
    by = {s["name"]: s for s in st["programs"]}
    for p in programs:
        s, o = by[p], old_status[p]
        if (s["phase"], s.get("variant")) != (o["phase"], o.get("variant")):
            problems.append(f"{kernel}/{p}: after the reboot {s['phase']} {s.get('variant')}, before {o['phase']} {o.get('variant')}")
        if not s.get("lastTransitionTime") or s["lastTransitionTime"] <= time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t_boot)):
            problems.append(f"{kernel}/{p}: lastTransitionTime {s.get('lastTransitionTime')} is not after the reboot")
    if loads < len(programs):
        problems.append(f"{kernel}: the rebooted agent counts {loads} loads, want one per program ({len(programs)}): nothing could be adopted")
    report["programIds"] = {p: {"before": old_status[p].get("programIds"), "after": by[p].get("programIds")} for p in programs}
    _ = old_metrics
    return problems, report
