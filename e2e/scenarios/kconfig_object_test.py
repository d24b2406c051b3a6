"""An outsider's object with `__kconfig` externs, loaded through a BpfPolyProgram in `make run`.

The object is node-agent/tests/fixtures/kconfig/kconfig_externs.c, built here with clang as
an outsider would: it reads LINUX_KERNEL_VERSION, LINUX_HAS_BPF_COOKIE,
LINUX_HAS_SYSCALL_WRAPPER, CONFIG_* externs of bool, tristate, int and string kinds and two
weak missing ones, and publishes what it saw in its array map `seen`. It goes into a
ConfigMap in `bpfpoly-system` and a BpfPolyProgram attaches it to the raw tracepoint
sys_enter; the test then reads `seen` with bpftool and checks every value against the
kernel's, read here independently (uname, /proc/config.gz or /boot/config-*, kallsyms).
Needs the `make run` stack (KUBECONFIG) and root; run by `make e2e` (e2e/scenarios/e2e.sh).
"""

import gzip
import json
import os
import subprocess
import tempfile
import time
import unittest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCE = os.path.join(REPO, "node-agent/tests/fixtures/kconfig/kconfig_externs.c")
NAME = "kconfig-prog"
KEYS = ["LINUX_KERNEL_VERSION", "LINUX_HAS_BPF_COOKIE", "LINUX_HAS_SYSCALL_WRAPPER", "CONFIG_BPF",
        "CONFIG_BPF_SYSCALL", "CONFIG_HZ", "CONFIG_NR_CPUS", "CONFIG_DEFAULT_HOSTNAME[0:8]",
        "weak missing bool", "weak missing int", "config global bias"]

PROGRAM = """apiVersion: bpfpoly.io/v1alpha1
kind: BpfPolyProgram
metadata: {name: %(name)s}
spec:
  # This host only: the microVM guests carry no kernel config (/proc/config.gz or /boot), so
  # their agents refuse the strong CONFIG_* externs by name, and as the rollout's canary the
  # first of them would hold the program back from this node.
  nodeSelector: {matchLabels: {bpfpoly.io/host: this-machine}}
  variants:
  - name: main
    bytecode:
      configMap: {namespace: bpfpoly-system, name: %(name)s, key: prog.o}
      sha256: "%(sha)s"
    programs:
    - name: read_kconfig
      attach: {rawTracepoint: {name: sys_enter}}
  config:
  - {name: bias, type: u64, value: "7"}
"""


def sh(*args, check=True, stdin=None, cwd=None):
    p = subprocess.run(args, capture_output=True, text=True, input=stdin, cwd=cwd)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({p.returncode}): {p.stdout}{p.stderr}")
    return p.stdout


def wait(what, fn, timeout=90):
    deadline, last = time.time() + timeout, None
    while time.time() < deadline:
        try:
            last = fn()
            if last:
                return last
        except (AssertionError, KeyError, IndexError, ValueError, subprocess.SubprocessError) as e:
            last = e
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def kernel_values():
    """What the program must see, from the kernel, without the agent's code."""
    release = os.uname().release
    a, b, c = (int(x) for x in release.split("-")[0].split(".")[:3])
    version = (a << 16) | (b << 8) | min(c, 255)
    boot = f"/boot/config-{release}"
    if os.path.exists(boot):
        text = open(boot).read()
    else:
        text = gzip.open("/proc/config.gz", "rt").read()
    config = dict(l.split("=", 1) for l in text.splitlines() if l.startswith("CONFIG_") and "=" in l)
    tri = {"y": 1, "m": 2}
    with open("/proc/kallsyms") as f:
        wrapper = any(l.split()[2:3] == ["__x64_sys_bpf"] for l in f)
    host = config["CONFIG_DEFAULT_HOSTNAME"].strip('"').encode()[:8].ljust(8, b"\0")
    return [version, int(version >= (5 << 16 | 15 << 8)), int(wrapper), tri.get(config.get("CONFIG_BPF"), 0),
            tri.get(config.get("CONFIG_BPF_SYSCALL"), 0), int(config["CONFIG_HZ"]), int(config["CONFIG_NR_CPUS"]),
            int.from_bytes(host, "little"), 0, 0, 7]


class KconfigObject(unittest.TestCase):
    def tearDown(self):
        sh("kubectl", "delete", "bpp", NAME, "--ignore-not-found", "--timeout=60s", check=False)
        sh("kubectl", "delete", "configmap", NAME, "-n", "bpfpoly-system", "--ignore-not-found", check=False)

    def test_kconfig_values_the_program_sees_are_the_kernels(self):
        with tempfile.TemporaryDirectory() as d:
            multiarch = sh("clang", "-print-multiarch", check=False).strip()
            inc = ["-idirafter", f"/usr/include/{multiarch}"] if multiarch else []
            obj = os.path.join(d, "prog.o")
            sh("clang", "-O2", "-g", "-target", "bpf", *inc, "-c", SOURCE, "-o", obj)
            sh("kubectl", "create", "configmap", NAME, "-n", "bpfpoly-system", f"--from-file=prog.o={obj}")
            sha = sh("sha256sum", obj).split()[0]
        sh("kubectl", "apply", "-f", "-", stdin=PROGRAM % {"name": NAME, "sha": sha})

        def loaded():
            st = json.loads(sh("kubectl", "get", "bns", "local", "-o", "json"))
            mine = [p for p in st.get("status", {}).get("programs", []) if p["name"] == NAME]
            return mine and mine[0]["phase"] == "Loaded" and mine[0]
        mine = wait(f"{NAME} Loaded on node local", loaded)
        prog = json.loads(sh("bpftool", "prog", "show", "id", str(mine["programIds"][0]), "-j"))
        self.assertEqual(prog["name"], "read_kconfig")
        maps = [json.loads(sh("bpftool", "map", "show", "id", str(m), "-j")) for m in prog["map_ids"]]
        seen = [m for m in maps if m["name"] == "seen"]
        self.assertEqual(len(seen), 1, maps)

        def values():
            dump = json.loads(sh("bpftool", "map", "dump", "id", str(seen[0]["id"]), "-j"))
            out = {e["formatted"]["key"]: e["formatted"]["value"] for e in dump}
            return out.get(0) and [out[k] for k in range(len(KEYS))]
        got = wait("the program to run", values, timeout=30)
        want = kernel_values()
        for key, g, w in zip(KEYS, got, want):
            self.assertEqual(g, w, f"{key}: the program saw {g}, the kernel has {w}")
        print(f"kconfig object: {dict(zip(KEYS, got))}")


if __name__ == "__main__":
    unittest.main(verbosity=2)
