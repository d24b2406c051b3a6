"""The README's "Load your own object" recipe, run as written on the `make run` stack.

An outsider's libbpf-style object (written and built here with clang, using nothing of
bpfpoly's: no bpfpoly.h, no config globals, no dispatch table) goes into a ConfigMap in
`bpfpoly-system`; the recipe's three commands are taken from README.md verbatim and run by
bash. The test then checks that the program is Ready, runs on this node's real kernel, and
counts real execs in its own map (read with bpftool). Run by `make e2e`, as root.
"""

import json
import os
import re
import subprocess
import tempfile
import time
import unittest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

OUTSIDER_C = r"""
// An ordinary libbpf program: counts execs in an array map.
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, __u64);
} exec_count SEC(".maps");

SEC("tracepoint/sched/sched_process_exec")
int count_exec(void *ctx)
{
    __u32 key = 0;
    __u64 *n = bpf_map_lookup_elem(&exec_count, &key);
    if (n)
        __sync_fetch_and_add(n, 1);
    return 0;
}

char LICENSE[] SEC("license") = "GPL";
"""


def sh(*args, check=True, stdin=None, cwd=None):
    p = subprocess.run(args, capture_output=True, text=True, input=stdin, cwd=cwd)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({p.returncode}): {p.stdout}{p.stderr}")
    return p.stdout


def recipe():
    """The shell block after the `<!-- recipe: own-object -->` marker in README.md."""
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    m = re.search(r"<!-- recipe: own-object -->\s*```sh\n(.*?)```", text, re.S)
    if not m:
        raise AssertionError("README.md has no `<!-- recipe: own-object -->` shell block")
    return m.group(1)


def wait(what, fn, timeout=60):
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


class OwnObject(unittest.TestCase):
    def tearDown(self):
        sh("kubectl", "delete", "bpp", "my-prog", "--ignore-not-found", "--timeout=60s", check=False)
        sh("kubectl", "delete", "configmap", "my-prog", "-n", "bpfpoly-system", "--ignore-not-found", check=False)

    def test_readme_recipe_loads_an_outsiders_libbpf_object(self):
        commands = recipe()
        self.assertEqual(len(re.findall(r"^kubectl |^SHA=", commands, re.M)), 3,
                         f"the recipe is three commands:\n{commands}")
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "my_prog.c"), "w") as f:
                f.write(OUTSIDER_C)
            multiarch = sh("clang", "-print-multiarch", check=False).strip()
            inc = ["-idirafter", f"/usr/include/{multiarch}"] if multiarch else []
            sh("clang", "-O2", "-g", "-target", "bpf", *inc, "-c", "my_prog.c", "-o", "my_prog.o", cwd=d)
            out = subprocess.run(["bash", "-euo", "pipefail", "-c", commands], cwd=d,
                                 capture_output=True, text=True)
            self.assertEqual(out.returncode, 0, f"the recipe failed:\n{out.stdout}{out.stderr}")

        def ready():
            p = json.loads(sh("kubectl", "get", "bpp", "my-prog", "-o", "json"))
            c = [c for c in p.get("status", {}).get("conditions", []) if c["type"] == "Ready"]
            return c and c[0]["status"] == "True" and c[0]
        wait("my-prog Ready", ready, timeout=90)
        st = json.loads(sh("kubectl", "get", "bns", "local", "-o", "json"))
        mine = [p for p in st["status"]["programs"] if p["name"] == "my-prog"]
        self.assertEqual(len(mine), 1, st["status"])
        self.assertEqual(mine[0]["phase"], "Loaded", mine[0])
        self.assertEqual(len(mine[0]["programIds"]), 1, mine[0])
        prog = json.loads(sh("bpftool", "prog", "show", "id", str(mine[0]["programIds"][0]), "-j"))
        self.assertEqual(prog["name"], "count_exec")
        self.assertEqual(prog["type"], "tracepoint")
        map_id = prog["map_ids"][0]

        def count():
            v = json.loads(sh("bpftool", "map", "lookup", "id", str(map_id), "key", "0", "0", "0", "0", "-j"))
            value = v.get("formatted", v).get("value", v.get("value"))
            return int(value) if isinstance(value, int) else int.from_bytes(bytes(int(b, 16) for b in value), "little")
        before = count()
        for _ in range(20):
            subprocess.run(["/bin/true"])
        after = wait("execs counted", lambda: count() >= before + 20 and count())
        print(f"own object: {after - before} execs counted by count_exec (program {prog['id']})")


if __name__ == "__main__":
    unittest.main(verbosity=2)
