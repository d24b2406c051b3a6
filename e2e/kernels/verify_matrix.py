#!/usr/bin/env python3
"""The verifier matrix: `bpfpoly-agent verify` against libbpf (`bpftool prog loadall`) on
every kernel of e2e/kernels/kernels.list (Debian, in qemu microVMs) and on this host,
program by program, for every object in ebpf/build/ and the parity corpus.

The parity corpus (node-agent/tests/fixtures/parity/*.c and the kconfig fixture) is built
here with clang as an outsider would. Each guest boots with no network (vm.sh verify), runs
both loaders on every object and powers off; its console carries the results. The host runs
the same two commands itself.

The rules are those of node-agent/tests/verify_parity.rs (the host-only test in `make
test`'s unit stage):
  - where libbpf loads the whole object, bpfpoly lists the same programs and verifies each;
  - where libbpf names a program the kernel refused, bpfpoly refuses it too;
  - where libbpf leaves a strong extern unresolved, bpfpoly refuses every program, naming it;
  - where libbpf refuses the object before any program, bpfpoly may load more ("beyond").
It fails on any disagreement, and when a kernel did not run. It writes
target/kernels/verify-matrix.json and prints one row per object and kernel.

Run by `make kernels` (e2e/kernels/matrix.sh); alone: `python3 e2e/kernels/verify_matrix.py
[KERNEL...]`. Needs root, qemu and bpftool; BPFPOLY_SKIP_PRIVILEGED=1 skips it, saying so.
"""

import base64
import concurrent.futures
import glob
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target"))
AGENT = os.path.join(TARGET, "release", "bpfpoly-agent")
OUT = os.path.join(TARGET, "kernels")
OBJECTS = os.path.join(OUT, "verify-objects")


def log(msg):
    print(f"[bpfpoly] verify-matrix: {msg}", flush=True)


def die(msg):
    print(f"[bpfpoly] verify-matrix: FAILED: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def kernels_listed():
    with open(os.path.join(HERE, "kernels.list")) as f:
        return [line.split()[0] for line in f if line.strip() and not line.startswith("#")]


def build_corpus():
    """ebpf/build/*.o as they are, the parity corpus built with clang as an outsider would."""
    shutil.rmtree(OBJECTS, ignore_errors=True)
    os.makedirs(OBJECTS)
    built = sorted(glob.glob(os.path.join(REPO, "ebpf", "build", "*.o")))
    if len(built) < 5:
        die(f"ebpf/build has {len(built)} objects: run `make -C ebpf` first")
    for o in built:
        shutil.copy(o, OBJECTS)
    sources = sorted(glob.glob(os.path.join(REPO, "node-agent/tests/fixtures/parity/*.c")))
    sources.append(os.path.join(REPO, "node-agent/tests/fixtures/kconfig/kconfig_externs.c"))
    multiarch = subprocess.run(["clang", "-print-multiarch"], capture_output=True, text=True).stdout.strip()
    for src in sources:
        out = os.path.join(OBJECTS, "parity-" + os.path.basename(src)[:-2] + ".o")
        r = subprocess.run(["clang", "-O2", "-g", "-target", "bpf", "-c", src, "-o", out,
                            "-idirafter", f"/usr/include/{multiarch}"], capture_output=True, text=True)
        if r.returncode != 0:
            die(f"clang {src}: {r.stderr}")
    return sorted(os.listdir(OBJECTS))


def parse_ours(name, raw, stderr):
    """`bpfpoly-agent verify -o json`: program -> (verified, reason)."""
    try:
        report = json.loads(raw)
    except ValueError as e:
        raise AssertionError(f"{name}: bpfpoly-agent verify printed no JSON report ({e}); stderr: {stderr[-400:]}")
    return {p["name"]: (p.get("result") == "verified", p.get("reason") or "") for p in report["programs"]}


def result(name, libbpf_rc, pinned, libbpf_log, ours_rc, ours_json, ours_err):
    return {"object": name, "libbpf_rc": libbpf_rc, "pinned": sorted(pinned), "libbpf_log": libbpf_log,
            "ours_rc": ours_rc, "ours": parse_ours(name, ours_json, ours_err)}


def run_host(objects):
    rows = []
    for n, name in enumerate(objects):
        o = os.path.join(OBJECTS, name)
        pin = f"/sys/fs/bpf/bpfpoly-verify-matrix-{os.getpid()}-{n}"
        subprocess.run(["rm", "-rf", pin])
        lb = subprocess.run(["bpftool", "prog", "loadall", o, pin], capture_output=True, text=True)
        pinned = os.listdir(pin) if os.path.isdir(pin) else []
        subprocess.run(["rm", "-rf", pin])
        ours = subprocess.run([AGENT, "verify", "-o", "json", o], capture_output=True, text=True)
        rows.append(result(name, lb.returncode, pinned, lb.stdout + lb.stderr, ours.returncode, ours.stdout, ours.stderr))
    return rows


def run_guest(kernel, objects):
    console = os.path.join(REPO, ".run", "kernels", f"verify-{kernel}.console.log")
    os.makedirs(os.path.dirname(console), exist_ok=True)
    t0 = time.monotonic()
    r = subprocess.run(["bash", os.path.join(HERE, "vm.sh"), "verify", kernel, OBJECTS, console],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise AssertionError(f"{kernel}: vm.sh verify failed:\n{r.stderr[-3000:]}")
    fields = {}
    with open(console, "rb") as f:
        for line in f.read().decode("utf-8", "replace").splitlines():
            if not line.startswith("bpfpoly-verify: "):
                continue
            parts = line[len("bpfpoly-verify: "):].rstrip("\r").split(" ", 2)
            if len(parts) >= 2:
                fields[(parts[0], parts[1])] = parts[2] if len(parts) > 2 else ""
    decode = lambda s: base64.b64decode(s.strip() or b"").decode("utf-8", "replace")  # noqa: E731
    rows = []
    for name in objects:
        if ("object", name) not in fields:
            raise AssertionError(f"{kernel}: the guest reported nothing for {name} (console {console})")
        lrc, orc = (int(x) for x in fields[("object", name)].split())
        rows.append(result(name, lrc, fields.get(("pinned", name), "").split(),
                           decode(fields.get(("libbpf-log", name), "")), orc,
                           decode(fields.get(("ours", name), "")), decode(fields.get(("ours-stderr", name), ""))))
    log(f"{kernel}: {len(rows)} objects in {time.monotonic() - t0:.0f} s (console {console})")
    return rows


def compare(kernel, row):
    """(problems, agreed, beyond, summary) for one object on one kernel."""
    name, ours, libbpf_log = row["object"], row["ours"], row["libbpf_log"]
    problems, agreed, beyond = [], 0, 0
    verified = sum(ok for ok, _ in ours.values())
    if (row["ours_rc"] == 0) != (verified == len(ours)):
        problems.append(f"{kernel} {name}: verify exited {row['ours_rc']} with {verified}/{len(ours)} verified")
    if row["libbpf_rc"] == 0:
        if row["pinned"] != sorted(ours):
            problems.append(f"{kernel} {name}: libbpf's programs {row['pinned']}, bpfpoly's {sorted(ours)}")
        for p in row["pinned"]:
            ok, reason = ours.get(p, (None, ""))
            if ok:
                agreed += 1
            elif ok is False:
                problems.append(f"{kernel} {name}: libbpf loads {p}, bpfpoly refused it: {reason}")
        summary = f"libbpf {len(row['pinned'])}/{len(row['pinned'])}, bpfpoly {verified}/{len(ours)}"
        return problems, agreed, beyond, summary
    refused = [l.split("prog '", 1)[1].split("'", 1)[0] for l in libbpf_log.splitlines()
               if "prog '" in l and "': failed to load" in l]
    for p in refused:
        ok, reason = ours.get(p, (None, ""))
        if ok is False:
            agreed += 1
        elif ok:
            problems.append(f"{kernel} {name}: libbpf refused {p}, bpfpoly loaded it\n{libbpf_log[-1500:]}")
        else:
            problems.append(f"{kernel} {name}: libbpf refused {p}, which bpfpoly does not list")
    unresolved = [l.split("'")[1] for l in libbpf_log.splitlines() if "(strong): not resolved" in l and "'" in l]
    for ext in unresolved:
        for p, (ok, reason) in ours.items():
            if ok or ext not in reason:
                problems.append(f"{kernel} {name}: libbpf did not resolve extern {ext}; bpfpoly "
                                f"{'loaded' if ok else 'refused without naming it:'} {p} ({reason})")
            else:
                agreed += 1
    if not refused and not unresolved:
        beyond += verified
    why = next((l.strip().removeprefix("libbpf: ") for l in libbpf_log.splitlines() if "failed" in l or "Error" in l or "not resolved" in l), "")
    summary = f"libbpf refuses ({why[:60]}); bpfpoly {verified}/{len(ours)}"
    return problems, agreed, beyond, summary


def main():
    if os.environ.get("BPFPOLY_SKIP_PRIVILEGED") == "1":
        log("SKIPPED (BPFPOLY_SKIP_PRIVILEGED=1): needs root, BPF and qemu")
        return 0
    if os.geteuid() != 0:
        die("loads eBPF programs here and boots microVMs: run it as root")
    for tool in ("bpftool", "clang", "qemu-system-x86_64"):
        if not shutil.which(tool):
            die(f"{tool} is missing (make deps installs it)")
    kernels = sys.argv[1:] or kernels_listed()
    if not os.access(AGENT, os.X_OK):
        die(f"{AGENT} missing: cargo build --release -p bpfpoly-agent")
    objects = build_corpus()
    log(f"{len(objects)} objects ({OBJECTS}) on {' '.join(kernels)} and this host")
    t0 = time.monotonic()
    results = {"host": run_host(objects)}
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = {k: pool.submit(run_guest, k, objects) for k in kernels}
        failures = []
        for k, fut in futures.items():
            try:
                results[k] = fut.result()
            except AssertionError as e:
                failures.append(str(e))
    if failures:
        die("\n".join(failures))
    problems, table, agreed, beyond = [], {}, 0, 0
    releases = {"host": os.uname().release}
    for k in kernels:
        with open(os.path.expanduser(f"~/.cache/bpfpoly/kernels/{k}/release")) as f:
            releases[k] = f.read().strip()
    for k, rows in results.items():
        for row in rows:
            p, a, b, summary = compare(k, row)
            problems += p
            agreed += a
            beyond += b
            table.setdefault(row["object"], {})[k] = summary
    columns = kernels + ["host"]
    print("| object | " + " | ".join(f"{k} ({releases[k]})" for k in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for obj in sorted(table):
        print(f"| {obj} | " + " | ".join(table[obj].get(k, "-") for k in columns) + " |")
    report = {"kernels": releases, "objects": objects, "agreed": agreed, "beyond": beyond,
              "problems": problems, "table": table,
              "results": {k: [{x: r[x] for x in ("object", "libbpf_rc", "pinned", "ours_rc")} |
                              {"ours": {p: {"verified": ok, "reason": why} for p, (ok, why) in r["ours"].items()}}
                              for r in rows] for k, rows in results.items()}}
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "verify-matrix.json"), "w") as f:
        json.dump(report, f, indent=1)
    log(f"wrote {os.path.join(OUT, 'verify-matrix.json')}; agreed with libbpf on {agreed} program results, "
        f"{beyond} loaded by bpfpoly where that libbpf refused the object, {len(columns)} kernels, "
        f"{time.monotonic() - t0:.0f} s")
    if problems:
        die("bpfpoly and libbpf disagree:\n" + "\n".join(problems))
    if agreed < 20 * len(columns):
        die(f"only {agreed} program results compared over {len(columns)} kernels: the corpus is too small")
    return 0


if __name__ == "__main__":
    sys.exit(main())
