"""The kernel matrix: every sample in crds/examples/ on every real kernel, asserted per kernel.

Runs against the stack `BPFPOLY_KERNELS="5.10 6.1 6.12 7.2" e2e/env/run.sh run` starts (matrix.sh):
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
  - the verifier-stage fallback of comm-stats carries that kernel's verifier log;
  - under freplace dispatch, a handler the verifier rejects leaves its slot empty and its
    key's frames take the default path (a freplace build of the badhandler fixture on a
    fourth veth pair), and a config update is make-before-break (new program ids, no frame
    of a handled key on the default path, counts never backwards, no gap);
  - node loss and reboot: one VM powered off abruptly (SIGKILL to qemu) stops counting as
    running every program within the operator's --node-lost-after plus one renewal
    interval, named with why; booted again (a fresh kernel: bpffs and programs gone), its
    agent loads everything afresh (new boot id, new load times) and the programs are Ready.
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


from matrix_checks import *  # noqa: F401,F403
from matrix_support import *  # noqa: F401,F403

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
    debian_kernels = [k for k in KERNELS]
    scenarios = {}
    for what, run in [
        ("freplaceRejectedHandler", lambda: check_freplace_rejected_handler(debian_kernels)),
        ("freplaceConfigUpdate", lambda: check_freplace_update(debian_kernels)),
    ]:
        t = time.time()
        try:
            problems += run()
        except (AssertionError, RuntimeError, OSError) as e:
            problems.append(f"{what}: {e}")
        scenarios[what] = {"seconds": round(time.time() - t, 1)}
    if LOSS_KERNEL in KERNELS:
        t = time.time()
        try:
            p, scenarios["nodeLossAndReboot"] = check_node_loss_and_reboot(LOSS_KERNEL, programs, len(nodes))
            problems += p
        except (AssertionError, RuntimeError, OSError) as e:
            problems.append(f"node loss and reboot of {LOSS_KERNEL}: {e}")
            scenarios["nodeLossAndReboot"] = {}
        scenarios["nodeLossAndReboot"]["seconds"] = round(time.time() - t, 1)
    report = {
        "generatedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "kernels": [{"kernel": k, "node": node_of(k), "release": profiles[node_of(k)]["kernel"]["release"],
                     "btfTypes": profiles[node_of(k)]["btf"].get("types"),
                     "programTypes": profiles[node_of(k)].get("programTypes"),
                     "where": "this host" if k == "host" else "qemu TCG microVM"} for k in kernels],
        "results": rows,
        "scenarios": scenarios,
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
