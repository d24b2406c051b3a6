#!/usr/bin/env python3
"""Tests of the Helm chart charts/bpfpoly, with Helm v4 through the helm-python-sdk wheel
(no helm binary) and the local Kubernetes 1.20 API server (e2e/env/cluster.sh).

    python3 e2e/scenarios/chart_test.py              everything (KUBECONFIG, else .run/cluster/kubeconfig)
    python3 e2e/scenarios/chart_test.py -k Schema    only the tests whose name contains "Schema"
    BPFPOLY_CHART_OFFLINE=1 python3 e2e/scenarios/chart_test.py   skip the API-server tests

What is tested:
  Lint        strict lint of the default values and of every value set below
  Render      the default values and four other value sets, asserted field by field: mounts
              (propagation, readOnly, hostPath), security contexts, RBAC verbs per resource,
              arguments, scheduling, monitoring objects, dashboard label; the agents' own-node
              ValidatingAdmissionPolicy, rendered as for a cluster serving it (>= 1.30) and
              absent otherwise (1.20, the offline default) or when agent.ownNodePolicy=false
  Schema      wrong types, unknown keys (at every level) and bad enums are rejected; every
              object of the schema closes additionalProperties; README lists every value
  Dashboard   the JSON parses, every PromQL metric name is one of the design's, each required
              panel exists
  ApiServer   every value set passes server-side validation (dry run); Bidirectional
              propagation is refused to an unprivileged container (why capabilities mode uses
              HostToContainer); install, `kubectl auth can-i` as the agent and the operator
              ServiceAccounts (and the exact rule lists), upgrade, uninstall

Everything a run creates carries a unique suffix (release ct-<id>, namespaces
bpfpoly-ct-<id>*) and is removed at the end, whatever happened. The run prints one line per
test with its time, then "N passed, N failed", and exits non-zero on any failure.
"""

from __future__ import annotations

import concurrent.futures
import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
import unittest
import uuid
from pathlib import Path
from typing import Any

import yaml

try:
    import helm_python as helm
except ImportError:  # pragma: no cover - reported once, clearly
    sys.exit("chart_test: the helm-python-sdk wheel is missing (bash e2e/env/install-deps.sh installs it)")

REPO = Path(__file__).resolve().parent.parent.parent
CHART_DIR = REPO / "charts" / "bpfpoly"
KUBECONFIG = os.environ.get("KUBECONFIG") or str(REPO / ".run" / "cluster" / "kubeconfig")
OFFLINE = os.environ.get("BPFPOLY_CHART_OFFLINE") == "1"

RUN_ID = uuid.uuid4().hex[:6]
RELEASE = f"ct-{RUN_ID}"
NS = f"bpfpoly-ct-{RUN_ID}"  # release namespace
NS_BC1 = f"{NS}-bc1"  # bytecode ConfigMaps allowed (install)
NS_BC2 = f"{NS}-bc2"  # bytecode ConfigMaps allowed (after the upgrade)
NS_OTHER = f"{NS}-other"  # never allowed
NAMESPACES = [NS, NS_BC1, NS_BC2, NS_OTHER]

CHART = helm.Chart.load(CHART_DIR)
APP_VERSION = CHART.metadata["appVersion"]

AGENT_CAPS = ["BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN", "SYS_RESOURCE"]

# --- value sets ------------------------------------------------------------------------

VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "capabilities": {"agent": {"securityMode": "capabilities", "hostNetwork": False}},
    "monitoring": {
        "metrics": {"podMonitor": {"enabled": True, "interval": "15s", "scrapeTimeout": "5s",
                                   "labels": {"release": "prometheus"}}},
        "dashboard": {"namespace": "monitoring", "labelKey": "bpfpoly.io/grafana-dashboard",
                      "labelValue": "bpfpoly", "annotations": {"grafana_folder": "eBPF"}},
    },
    "scheduling": {
        "image": {"repository": "localhost:5000/bpfpoly", "tag": "0.2.0-rc.1"},
        "operator": {"replicas": 3, "leaderElection": {"leaseName": "bpfpoly-leader"},
                     "podDisruptionBudget": {"enabled": True, "minAvailable": 2},
                     "tolerations": [{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists",
                                      "effect": "NoSchedule"}]},
        "agent": {
            "configMapNamespaces": ["bytecode-a", "bytecode-b"],
            "allowedBytecodeDirs": ["/var/lib/bpfpoly", "/opt/bpf-objects"],
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ebpf", "effect": "NoSchedule"}],
            "nodeSelector": {"bpfpoly.io/agent": "true"},
            "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
            "updateStrategy": {"maxUnavailable": "10%"},
            "priorityClassName": "system-node-critical",
            "extraArgs": ["--interface-alias", "eth0=ens5"],
        },
    },
    "single-operator": {"operator": {"replicas": 1, "leaderElection": {"enabled": False}},
                        "dashboard": {"enabled": False}},
}

# --- expected RBAC (what the operator and the agent need; see the chart README) ----------

# (apiGroup, resource) -> verbs, for the ClusterRoles.
OPERATOR_CLUSTER_RULES = {
    ("bpfpoly.io", "bpfpolyprograms"): {"get", "list", "watch", "patch", "update"},
    ("bpfpoly.io", "bpfpolyprograms/status"): {"get", "patch", "update"},
    ("bpfpoly.io", "bpfpolyprograms/finalizers"): {"update"},
    ("bpfpoly.io", "bpfnodestates"): {"get", "list", "watch", "create", "patch", "delete"},
    ("bpfpoly.io", "bpfnodeprofiles"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "nodes"): {"get", "list", "watch"},
}
AGENT_CLUSTER_RULES = {
    ("bpfpoly.io", "bpfpolyprograms"): {"get", "list", "watch"},
    ("bpfpoly.io", "bpfnodestates"): {"get", "list", "watch"},  # spec is the operator's
    ("bpfpoly.io", "bpfnodeprofiles"): {"get", "list", "watch", "create", "patch"},
    ("bpfpoly.io", "bpfnodestates/status"): {"get", "patch", "update"},
    ("bpfpoly.io", "bpfnodeprofiles/status"): {"get", "patch", "update"},
    ("", "nodes"): {"get"},
}
EVENTS_RULES = {("events.k8s.io", "events"): {"create", "patch"}}
LEASE_NS = "kube-node-lease"
AGENT_LEASE_RULES = {("coordination.k8s.io", "leases"): {"get", "create", "update", "patch"}}
OPERATOR_LEASE_RULES = {("coordination.k8s.io", "leases"): {"get", "list", "watch"}}
CONFIGMAP_RULES = {("", "configmaps"): {"get", "list", "watch"}}

# --- metric names of the design (../shared/design.md, "Metrics") ------------------------

DESIGN_METRICS = {
    "bpfpoly_program_info", "bpfpoly_variant_fallbacks_total", "bpfpoly_verifier_rejections_total",
    "bpfpoly_handler_degraded", "bpfpoly_config_fallbacks", "bpfpoly_dispatch_total",
    "bpfpoly_dispatch_default_total", "bpfpoly_load_duration_seconds", "bpfpoly_prog_run_seconds_total",
    "bpfpoly_prog_runs_total", "bpfpoly_reconcile_duration_seconds", "bpfpoly_nodes",
    "bpfpoly_rollout_paused",
}
DESIGN_HISTOGRAMS = {"bpfpoly_load_duration_seconds", "bpfpoly_reconcile_duration_seconds"}
ALLOWED_SERIES = DESIGN_METRICS | {f"{h}_{s}" for h in DESIGN_HISTOGRAMS for s in ("bucket", "sum", "count")}
# The panels the issue asks for: each needs a panel using these series.
REQUIRED_SERIES = {
    "bpfpoly_program_info", "bpfpoly_variant_fallbacks_total", "bpfpoly_verifier_rejections_total",
    "bpfpoly_dispatch_total", "bpfpoly_dispatch_default_total", "bpfpoly_handler_degraded",
    "bpfpoly_config_fallbacks", "bpfpoly_load_duration_seconds_bucket", "bpfpoly_prog_run_seconds_total",
    "bpfpoly_prog_runs_total", "bpfpoly_rollout_paused", "bpfpoly_nodes",
}

# ========================================================================================
# helpers
# ========================================================================================


def render(values: dict[str, Any], namespace: str = "bpfpoly-system", name: str = "demo") -> dict[str, str]:
    return CHART.render(values, name=name, namespace=namespace)


# What `helm template --api-versions <v> --kube-version <k>` renders for: a cluster serving
# ValidatingAdmissionPolicy (>= 1.30), which neither the offline default nor 1.20 does.
VAP_API = "admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy"


def render_for(values: dict[str, Any], *, api_versions: list[str] | None = None, kube_version: str | None = None,
               namespace: str = "bpfpoly-system", name: str = "demo") -> dict[str, str]:
    """An offline render with extra API versions and a Kubernetes version, the equivalents of
    `helm template --api-versions --kube-version`. The wheel's Chart.render does not expose
    them; its library's render options do (and refuse unknown option names, so a misspelt
    option fails here instead of being ignored)."""
    from helm_python import _native

    opts: dict[str, Any] = {"name": name, "namespace": namespace}
    if api_versions is not None:
        opts["api_versions"] = api_versions
    if kube_version is not None:
        opts["kube_version"] = kube_version
    return json.loads(_native.call_string("helm_render", CHART._raw(), json.dumps(values), json.dumps(opts)))


def cel_syntax_problems(expr: str) -> list[str]:
    """Cheap CEL sanity checks (no CEL library here): every string literal closed, brackets
    balanced and properly nested."""
    rest = re.sub(r"'(?:[^'\\\n]|\\.)*'|\"(?:[^\"\\\n]|\\.)*\"", "S", expr)  # literals out
    if "'" in rest or '"' in rest:
        return [f"unterminated string literal in {expr!r}"]
    stack: list[str] = []
    for ch in rest:
        if ch in "([{":
            stack.append(ch)
        elif ch in ")]}" and (not stack or stack.pop() != "([{"[")]}".index(ch)]):
            return [f"unbalanced {ch} in {expr!r}"]
    return [f"unclosed {''.join(stack)} in {expr!r}"] if stack else []


def objects_of(rendered: dict[str, str]) -> list[dict[str, Any]]:
    out = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                out.append(doc)
    return out


def manifest_objects(manifest: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(manifest) if d]


def find(objs: list[dict[str, Any]], kind: str, name: str | None = None, namespace: str | None = None,
         *, name_suffix: str | None = None) -> dict[str, Any]:
    hits = [o for o in objs if o["kind"] == kind
            and (name is None or o["metadata"]["name"] == name)
            and (name_suffix is None or o["metadata"]["name"].endswith(name_suffix))
            and (namespace is None or o["metadata"].get("namespace") == namespace)]
    if len(hits) != 1:
        raise AssertionError(f"expected one {kind} {name or name_suffix or ''} in {namespace or 'any namespace'}, "
                             f"found {len(hits)}: {[o['metadata']['name'] for o in hits]}")
    return hits[0]


def kinds(objs: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for o in objs:
        out[o["kind"]] = out.get(o["kind"], 0) + 1
    return out


def rules_of(role: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    """(apiGroup, resource) -> verbs, for rules without resourceNames."""
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        if rule.get("resourceNames") or rule.get("nonResourceURLs"):
            continue
        for group in rule["apiGroups"]:
            for res in rule["resources"]:
                out.setdefault((group, res), set()).update(rule["verbs"])
    return out


def container(workload: dict[str, Any]) -> dict[str, Any]:
    cs = workload["spec"]["template"]["spec"]["containers"]
    assert len(cs) == 1, cs
    return cs[0]


def mounts(workload: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["mountPath"]: m for m in container(workload)["volumeMounts"]}


def volumes(workload: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}


def env_of(workload: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container(workload)["env"]}


def merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merged(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def kubectl(*args: str, input: str | None = None, check: bool = True, timeout: int = 60) -> subprocess.CompletedProcess:
    cp = subprocess.run(["kubectl", "--kubeconfig", KUBECONFIG, *args], input=input, text=True,
                        capture_output=True, timeout=timeout)
    if check and cp.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed ({cp.returncode}): {cp.stderr.strip()}")
    return cp


def exists(kind: str, name: str, namespace: str | None) -> bool:
    args = ["get", kind, name, "-o", "name"]
    if namespace:
        args += ["-n", namespace]
    cp = kubectl(*args, check=False)
    if cp.returncode == 0:
        return True
    if "NotFound" in cp.stderr or "not found" in cp.stderr:
        return False
    raise AssertionError(f"kubectl get {kind} {name}: {cp.stderr.strip()}")


def get_json(kind: str, name: str, namespace: str | None = None) -> dict[str, Any]:
    args = ["get", kind, name, "-o", "json"]
    if namespace:
        args += ["-n", namespace]
    return json.loads(kubectl(*args).stdout)


def kind_ref(obj: dict[str, Any]) -> str:
    """A kubectl resource reference that cannot be ambiguous: kind.version.group."""
    group_version = obj["apiVersion"]
    group, _, version = group_version.rpartition("/")
    return f"{obj['kind']}.{version}.{group}" if group else f"{obj['kind']}"


def sa(name: str) -> str:
    return f"system:serviceaccount:{NS}:{name}"


def can_i(user: str, verb: str, resource: str, namespace: str | None = None,
          subresource: str | None = None, name: str | None = None) -> bool:
    args = ["auth", "can-i", verb, f"{resource}/{name}" if name else resource, f"--as={user}"]
    if subresource:
        args.append(f"--subresource={subresource}")
    if namespace == "*":
        args.append("--all-namespaces")
    elif namespace:
        args += ["-n", namespace]
    cp = kubectl(*args, check=False)
    answer = cp.stdout.strip()
    if answer not in ("yes", "no"):
        raise AssertionError(f"kubectl {' '.join(args)}: unexpected answer {answer!r} ({cp.stderr.strip()})")
    return answer == "yes"


def rules_list(user: str, namespace: str) -> set[tuple[str, str, str]]:
    """`kubectl auth can-i --list` as (resource, resourceNames, verb) triples."""
    out = kubectl("auth", "can-i", "--list", f"--as={user}", "-n", namespace).stdout.splitlines()
    header = out[0]
    cols = [header.index(h) for h in ("Resources", "Non-Resource URLs", "Resource Names", "Verbs")]
    triples = set()
    for line in out[1:]:
        resource = line[cols[0]:cols[1]].strip()
        if not resource:
            continue  # non-resource URLs: the same for everyone
        names = line[cols[2]:cols[3]].strip().strip("[]")
        for verb in line[cols[3]:].strip().strip("[]").split():
            triples.add((resource, names, verb))
    return triples


def promql_metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression selects (function names, keywords, label
    names in grouping clauses and matchers, and Grafana variables left out)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    e = re.sub(r"\{[^}]*\}", "", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)  # range selectors
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\$\{?\w+\}?", " ", e)  # Grafana variables
    keywords = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
                "and", "or", "unless", "inf", "nan"}
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        word = m.group(0)
        rest = e[m.end():].lstrip()
        if rest.startswith("("):
            continue  # a function or an aggregation
        if word.lower() in keywords:
            continue
        if re.fullmatch(r"[0-9.eE+-]+", word):
            continue
        names.add(word)
    return names


def schema_paths(schema: dict[str, Any], root: dict[str, Any], prefix: str = "") -> list[str]:
    """Every value path the schema declares (not descending into free-form maps)."""
    if "$ref" in schema:
        schema = root["definitions"][schema["$ref"].split("/")[-1]]
    out = []
    for key, sub in schema.get("properties", {}).items():
        path = f"{prefix}.{key}" if prefix else key
        out.append(path)
        resolved = root["definitions"][sub["$ref"].split("/")[-1]] if "$ref" in sub else sub
        if resolved.get("type") == "object" and "properties" in resolved and resolved.get("additionalProperties") is False \
                and not (resolved.get("description", "").startswith("Container resources")
                         or resolved.get("description", "").startswith("Kubernetes affinity")):
            out.extend(schema_paths(resolved, root, path))
    return out


# ========================================================================================
# Lint
# ========================================================================================


class T1Lint(unittest.TestCase):
    def test_strict_lint_default_values(self):
        report = helm.lint(CHART_DIR, strict=True)
        self.assertEqual(report["errors"], [], report)
        warnings = [m for m in report["messages"] if m["severity"] >= 2]
        self.assertEqual(warnings, [], "strict lint treats warnings as errors")

    def test_strict_lint_every_value_set(self):
        for name, values in VALUE_SETS.items():
            with self.subTest(values=name):
                report = helm.lint(CHART_DIR, values, strict=True, namespace=NS)
                self.assertEqual(report["errors"], [], f"{name}: {report}")
                self.assertEqual([m for m in report["messages"] if m["severity"] >= 2], [], name)

    def test_strict_lint_against_kubernetes_1_20(self):
        report = helm.lint(CHART_DIR, strict=True, kube_version="v1.20.2")
        self.assertEqual(report["errors"], [], report)

    def test_lint_reports_bad_values(self):
        report = helm.lint(CHART_DIR, {"agent": {"securityMode": "root"}}, strict=True)
        self.assertTrue(any("securityMode" in e for e in report["errors"]), report)

    def test_crds_in_sync_with_generated(self):
        self.assertEqual((CHART_DIR / "crds" / "bpfpoly.io_crds.yaml").read_text(),
                         (REPO / "crds" / "bpfpoly.io_crds.yaml").read_text(),
                         "charts/bpfpoly/crds/ is stale: run `make crds`")
        names = {c["name"] for c in CHART.crds}
        self.assertTrue(names, "the chart ships no CRDs")
        kinds_ = {d["spec"]["names"]["kind"] for c in CHART.crds for d in yaml.safe_load_all(c["data"]) if d}
        self.assertEqual(kinds_, {"BpfPolyProgram", "BpfNodeState", "BpfNodeProfile"})


# ========================================================================================
# Render
# ========================================================================================


class T2Render(unittest.TestCase):
    maxDiff = None

    def objs(self, name: str, namespace: str = "bpfpoly-system") -> list[dict[str, Any]]:
        return objects_of(render(VALUE_SETS[name], namespace=namespace))

    # --- default values ---

    def test_default_objects(self):
        objs = self.objs("default")
        # ServiceAccount, ClusterRole, ClusterRoleBinding and Job: one each of the pre-delete
        # hook that unloads the programs on uninstall (uninstall.unloadPrograms). Role and
        # RoleBinding: events and leader election, and the agents' liveness Leases in
        # kube-node-lease (one pair for the agent, one for the operator).
        self.assertEqual(kinds(objs), {"ServiceAccount": 3, "ClusterRole": 3, "ClusterRoleBinding": 3, "Role": 4,
                                       "RoleBinding": 4, "Deployment": 1, "DaemonSet": 1, "ConfigMap": 1, "Job": 1})
        for o in objs:
            labels = o["metadata"]["labels"]
            self.assertEqual(labels["app.kubernetes.io/instance"], "demo", o["metadata"]["name"])
            self.assertEqual(labels["app.kubernetes.io/managed-by"], "Helm")
            if o["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
                self.assertIn("namespace", o["metadata"], f"{o['kind']} {o['metadata']['name']} has no namespace")

    def test_default_operator_deployment(self):
        objs = self.objs("default")
        d = find(objs, "Deployment", "demo-bpfpoly-operator", "bpfpoly-system")
        spec = d["spec"]
        self.assertEqual(spec["replicas"], 2)
        pod = spec["template"]["spec"]
        self.assertEqual(pod["serviceAccountName"], "demo-bpfpoly-operator")
        self.assertEqual(pod["securityContext"]["runAsNonRoot"], True)
        self.assertNotEqual(pod["securityContext"]["runAsUser"], 0)
        self.assertEqual(pod["securityContext"]["seccompProfile"], {"type": "RuntimeDefault"})
        self.assertNotIn("hostNetwork", pod)
        c = container(d)
        self.assertEqual(c["image"], f"bpfpoly/bpfpoly:{APP_VERSION}")
        self.assertEqual(c["command"], ["bpfpoly-operator"])
        self.assertEqual(c["args"], ["run", "--metrics-addr=:9465", "--lease-namespace=$(POD_NAMESPACE)",
                                     "--lease-name=bpfpoly-operator", "--lease-seconds=15",
                                     "--identity=$(POD_NAME)", "--unload-timeout=60",
                                     "--node-lost-after=20", "--node-lease-namespace=kube-node-lease"])
        sc = c["securityContext"]
        self.assertEqual(sc, {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532,
                              "readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
                              "privileged": False, "capabilities": {"drop": ["ALL"]}})
        env = env_of(d)
        self.assertEqual(env["POD_NAME"]["valueFrom"], {"fieldRef": {"fieldPath": "metadata.name"}})
        self.assertEqual(env["POD_NAMESPACE"]["valueFrom"], {"fieldRef": {"fieldPath": "metadata.namespace"}})
        self.assertEqual(c["ports"], [{"name": "metrics", "containerPort": 9465, "protocol": "TCP"}])
        self.assertEqual(c["livenessProbe"]["httpGet"], {"path": "/healthz", "port": "metrics"})
        self.assertEqual(c["readinessProbe"]["httpGet"], {"path": "/readyz", "port": "metrics"})
        self.assertNotIn("volumeMounts", c, "the operator needs no volumes")
        anti = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]
        self.assertEqual(anti["podAffinityTerm"]["labelSelector"]["matchLabels"], spec["selector"]["matchLabels"])
        # The selector must pick the operator's Pods only, never the agent's.
        self.assertEqual(spec["selector"]["matchLabels"]["app.kubernetes.io/component"], "operator")

    def test_default_agent_daemonset(self):
        objs = self.objs("default")
        ds = find(objs, "DaemonSet", "demo-bpfpoly-agent", "bpfpoly-system")
        pod = ds["spec"]["template"]["spec"]
        self.assertEqual(pod["serviceAccountName"], "demo-bpfpoly-agent")
        self.assertIs(pod["hostNetwork"], True)
        self.assertEqual(pod["dnsPolicy"], "ClusterFirstWithHostNet")
        self.assertEqual(pod["tolerations"], [{"operator": "Exists"}])
        self.assertEqual(pod["nodeSelector"], {"kubernetes.io/os": "linux"})
        c = container(ds)
        self.assertEqual(c["command"], ["bpfpoly-agent"])
        self.assertEqual(c["args"], ["run", "--node-name=$(NODE_NAME)", "--btf-path=/sys/kernel/btf/vmlinux",
                                     "--bpffs-root=/sys/fs/bpf/bpfpoly", "--metrics-addr=:9464",
                                     "--lease-namespace=kube-node-lease", "--lease-renew-interval=5",
                                     "--allowed-bytecode-dirs=/var/lib/bpfpoly"])
        self.assertEqual(env_of(ds)["NODE_NAME"]["valueFrom"], {"fieldRef": {"fieldPath": "spec.nodeName"}})
        self.assertEqual(c["securityContext"], {"runAsUser": 0, "runAsNonRoot": False,
                                                "readOnlyRootFilesystem": True, "privileged": True})
        m = mounts(ds)
        self.assertEqual(set(m), {"/sys/fs/bpf", "/sys/kernel/btf", "/sys/kernel/tracing", "/var/lib/bpfpoly"})
        self.assertEqual(m["/sys/fs/bpf"].get("mountPropagation"), "Bidirectional")
        self.assertFalse(m["/sys/fs/bpf"].get("readOnly", False))
        self.assertIs(m["/sys/kernel/btf"].get("readOnly"), True)
        self.assertNotIn("mountPropagation", m["/sys/kernel/btf"])
        self.assertFalse(m["/sys/kernel/tracing"].get("readOnly", False))
        self.assertEqual(m["/sys/kernel/tracing"].get("mountPropagation"), "HostToContainer")
        self.assertIs(m["/var/lib/bpfpoly"].get("readOnly"), True)
        v = volumes(ds)
        hostpaths = {m_["mountPath"]: v[m_["name"]]["hostPath"] for m_ in c["volumeMounts"]}
        self.assertEqual(hostpaths["/sys/fs/bpf"], {"path": "/sys/fs/bpf", "type": "Directory"})
        self.assertEqual(hostpaths["/sys/kernel/btf"], {"path": "/sys/kernel/btf"})
        self.assertEqual(hostpaths["/sys/kernel/tracing"], {"path": "/sys/kernel/tracing"})
        self.assertEqual(hostpaths["/var/lib/bpfpoly"], {"path": "/var/lib/bpfpoly", "type": "DirectoryOrCreate"})
        self.assertEqual(c["ports"], [{"name": "metrics", "containerPort": 9464, "protocol": "TCP"}])
        self.assertEqual(c["livenessProbe"]["httpGet"], {"path": "/healthz", "port": "metrics"})
        self.assertEqual(c["readinessProbe"]["httpGet"], {"path": "/readyz", "port": "metrics"})
        self.assertEqual(ds["spec"]["updateStrategy"], {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}})
        self.assertEqual(ds["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"], "agent")

    def test_default_rbac(self):
        objs = self.objs("default")
        op = find(objs, "ClusterRole", "demo-bpfpoly-operator")
        ag = find(objs, "ClusterRole", "demo-bpfpoly-agent")
        self.assertEqual(rules_of(op), OPERATOR_CLUSTER_RULES)
        self.assertEqual(rules_of(ag), AGENT_CLUSTER_RULES)
        lease = find(objs, "Role", "demo-bpfpoly-operator-lease", "bpfpoly-system")
        self.assertEqual(rules_of(lease), {("coordination.k8s.io", "leases"): {"create"}})
        named = [r for r in lease["rules"] if r.get("resourceNames")]
        self.assertEqual(named, [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                                  "resourceNames": ["bpfpoly-operator"], "verbs": ["get", "update", "patch"]}])
        events = find(objs, "Role", "demo-bpfpoly-events", "default")
        self.assertEqual(rules_of(events), EVENTS_RULES)
        eb = find(objs, "RoleBinding", "demo-bpfpoly-events", "default")
        self.assertEqual(sorted(s["name"] for s in eb["subjects"]), ["demo-bpfpoly-agent", "demo-bpfpoly-operator"])
        self.assertTrue(all(s["namespace"] == "bpfpoly-system" for s in eb["subjects"]))
        for crb, sa_name in (("demo-bpfpoly-operator", "demo-bpfpoly-operator"), ("demo-bpfpoly-agent", "demo-bpfpoly-agent")):
            b = find(objs, "ClusterRoleBinding", crb)
            self.assertEqual(b["roleRef"], {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": crb})
            self.assertEqual(b["subjects"], [{"kind": "ServiceAccount", "name": sa_name, "namespace": "bpfpoly-system"}])
        # Least privilege, across every role: no wildcards, no Secrets, ConfigMaps only in
        # per-namespace Roles, nothing writes BpfPolyProgram specs except patch/update by
        # the operator.
        for role in [o for o in objs if o["kind"] in ("ClusterRole", "Role")]:
            for rule in role["rules"]:
                for field in ("apiGroups", "resources", "verbs"):
                    self.assertNotIn("*", rule[field], f"{role['metadata']['name']}: wildcard in {field}")
                self.assertNotIn("secrets", rule["resources"], role["metadata"]["name"])
                self.assertNotIn("configmaps", rule["resources"], role["metadata"]["name"])
                self.assertFalse({"escalate", "bind", "impersonate"} & set(rule["verbs"]))
        self.assertFalse([o for o in objs if o["kind"] == "Role" and o["metadata"]["name"].endswith("-bytecode")],
                         "no configMapNamespaces: no ConfigMap access anywhere")
        dash = find(objs, "ConfigMap", "demo-bpfpoly-dashboard", "bpfpoly-system")
        self.assertEqual(dash["metadata"]["labels"]["grafana_dashboard"], "1")
        json.loads(dash["data"]["bpfpoly.json"])

    def test_default_notes(self):
        notes = render({})["bpfpoly/templates/NOTES.txt"]
        for text in ("kubectl get bpfnodeprofiles", "kubectl get bpfpolyprograms", "bpfpoly-operator explain",
                     "kubectl get bpfnodestate", "metrics.podMonitor.enabled=true", "grafana_dashboard=\"1\"",
                     "agent.configMapNamespaces is empty"):
            self.assertIn(text, notes)
        self.assertNotIn("capabilities mode", notes)

    # --- capabilities mode ---

    def test_capabilities_mode(self):
        objs = self.objs("capabilities")
        ds = find(objs, "DaemonSet", "demo-bpfpoly-agent")
        sc = container(ds)["securityContext"]
        self.assertEqual(sc, {"runAsUser": 0, "runAsNonRoot": False, "readOnlyRootFilesystem": True,
                              "privileged": False, "allowPrivilegeEscalation": False,
                              "capabilities": {"drop": ["ALL"], "add": AGENT_CAPS}})
        m = mounts(ds)
        # Kubernetes refuses Bidirectional to unprivileged containers (tested on the server below).
        self.assertEqual(m["/sys/fs/bpf"]["mountPropagation"], "HostToContainer")
        self.assertIs(m["/sys/kernel/btf"]["readOnly"], True)
        self.assertEqual(set(m), {"/sys/fs/bpf", "/sys/kernel/btf", "/sys/kernel/tracing", "/var/lib/bpfpoly"})
        pod = ds["spec"]["template"]["spec"]
        self.assertIs(pod["hostNetwork"], False)
        self.assertNotIn("dnsPolicy", pod)
        # The operator is the same in both modes.
        self.assertEqual(container(find(objs, "Deployment"))["securityContext"],
                         container(find(self.objs("default"), "Deployment"))["securityContext"])
        notes = render(VALUE_SETS["capabilities"])["bpfpoly/templates/NOTES.txt"]
        self.assertIn("capabilities mode /sys/fs/bpf is mounted HostToContainer", notes)

    # --- monitoring on, custom dashboard label ---

    def test_monitoring_podmonitor(self):
        objs = self.objs("monitoring")
        pm = find(objs, "PodMonitor", "demo-bpfpoly", "bpfpoly-system")
        self.assertEqual(pm["apiVersion"], "monitoring.coreos.com/v1")
        self.assertEqual(pm["metadata"]["labels"]["release"], "prometheus")
        self.assertEqual(pm["spec"]["namespaceSelector"], {"matchNames": ["bpfpoly-system"]})
        [ep] = pm["spec"]["podMetricsEndpoints"]
        self.assertEqual((ep["port"], ep["path"], ep["interval"], ep["scrapeTimeout"]), ("metrics", "/metrics", "15s", "5s"))
        self.assertIn({"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node"}, ep["relabelings"])
        # An agent's series carry its node, not its Pod name or IP.
        self.assertIn({"sourceLabels": ["__meta_kubernetes_pod_label_app_kubernetes_io_component",
                                        "__meta_kubernetes_pod_node_name"],
                       "regex": "agent;(.+)", "targetLabel": "instance", "replacement": "$1"}, ep["relabelings"])
        self.assertIn({"sourceLabels": ["__meta_kubernetes_pod_label_app_kubernetes_io_component"],
                       "regex": "agent", "targetLabel": "pod", "replacement": ""}, ep["relabelings"])
        # The selector picks the Pods of both workloads, and they expose a "metrics" port.
        sel = pm["spec"]["selector"]
        for kind in ("Deployment", "DaemonSet"):
            w = find(objs, kind)
            labels = w["spec"]["template"]["metadata"]["labels"]
            self.assertTrue(all(labels.get(k) == v for k, v in sel["matchLabels"].items()), kind)
            for expr in sel["matchExpressions"]:
                self.assertEqual(expr["operator"], "In")
                self.assertIn(labels[expr["key"]], expr["values"], kind)
            self.assertEqual([p["name"] for p in container(w)["ports"]], ["metrics"])
        self.assertIn("PodMonitor demo-bpfpoly", render(VALUE_SETS["monitoring"])["bpfpoly/templates/NOTES.txt"])

    def test_monitoring_dashboard_label(self):
        objs = self.objs("monitoring")
        cm = find(objs, "ConfigMap", "demo-bpfpoly-dashboard", "monitoring")
        labels = cm["metadata"]["labels"]
        self.assertEqual(labels["bpfpoly.io/grafana-dashboard"], "bpfpoly")
        self.assertNotIn("grafana_dashboard", labels)
        self.assertEqual(cm["metadata"]["annotations"], {"grafana_folder": "eBPF"})
        self.assertEqual(json.loads(cm["data"]["bpfpoly.json"]),
                         json.loads((CHART_DIR / "dashboards" / "bpfpoly.json").read_text()))

    def test_monitoring_off_by_default(self):
        self.assertNotIn("PodMonitor", kinds(self.objs("default")))
        self.assertNotIn("monitoring.coreos.com", "".join(render({}).values()))
        self.assertNotIn("ConfigMap", kinds(self.objs("single-operator")), "dashboard.enabled=false")

    # --- ConfigMap namespaces, scheduling, resources, image ---

    def test_configmap_namespaces_rbac(self):
        objs = self.objs("scheduling")
        for ns in ("bytecode-a", "bytecode-b"):
            role = find(objs, "Role", "demo-bpfpoly-agent-bytecode", ns)
            self.assertEqual(role["rules"], [{"apiGroups": [""], "resources": ["configmaps"],
                                              "verbs": ["get", "list", "watch"]}])
            rb = find(objs, "RoleBinding", "demo-bpfpoly-agent-bytecode", ns)
            self.assertEqual(rb["roleRef"]["name"], "demo-bpfpoly-agent-bytecode")
            self.assertEqual(rb["subjects"], [{"kind": "ServiceAccount", "name": "demo-bpfpoly-agent",
                                               "namespace": "bpfpoly-system"}])
        self.assertEqual(len([o for o in objs if o["kind"] == "Role" and o["metadata"]["name"].endswith("-bytecode")]), 2)
        ds = find(objs, "DaemonSet")
        self.assertIn("--configmap-namespaces=bytecode-a,bytecode-b", container(ds)["args"])

    def test_scheduling_and_resources(self):
        values = VALUE_SETS["scheduling"]["agent"]
        objs = self.objs("scheduling")
        ds = find(objs, "DaemonSet")
        pod = ds["spec"]["template"]["spec"]
        self.assertEqual(pod["tolerations"], values["tolerations"])
        # Helm merges maps with the defaults (a key set to null removes a default one).
        self.assertEqual(pod["nodeSelector"], {"kubernetes.io/os": "linux", **values["nodeSelector"]})
        no_os = objects_of(render(merged(VALUE_SETS["scheduling"], {"agent": {"nodeSelector": {"kubernetes.io/os": None}}})))
        self.assertEqual(find(no_os, "DaemonSet")["spec"]["template"]["spec"]["nodeSelector"], values["nodeSelector"])
        self.assertEqual(pod["priorityClassName"], "system-node-critical")
        self.assertEqual(container(ds)["resources"], values["resources"])
        self.assertEqual(ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"], "10%")
        self.assertEqual(container(ds)["image"], "localhost:5000/bpfpoly:0.2.0-rc.1")
        self.assertEqual(container(ds)["args"][-3:], ["--configmap-namespaces=bytecode-a,bytecode-b",
                                                      "--interface-alias", "eth0=ens5"])
        self.assertIn("--allowed-bytecode-dirs=/var/lib/bpfpoly,/opt/bpf-objects", container(ds)["args"])
        m = mounts(ds)
        for d in ("/var/lib/bpfpoly", "/opt/bpf-objects"):
            self.assertIs(m[d]["readOnly"], True, d)
            self.assertEqual(volumes(ds)[m[d]["name"]]["hostPath"], {"path": d, "type": "DirectoryOrCreate"})
        dep = find(objs, "Deployment")
        self.assertEqual(dep["spec"]["replicas"], 3)
        self.assertEqual(dep["spec"]["template"]["spec"]["tolerations"], VALUE_SETS["scheduling"]["operator"]["tolerations"])
        self.assertIn("--lease-name=bpfpoly-leader", container(dep)["args"])
        lease = find(objs, "Role", "demo-bpfpoly-operator-lease")
        self.assertEqual([r.get("resourceNames") for r in lease["rules"]], [None, ["bpfpoly-leader"]])
        pdb = find(objs, "PodDisruptionBudget", "demo-bpfpoly-operator")
        self.assertEqual(pdb["spec"]["minAvailable"], 2)
        self.assertEqual(pdb["spec"]["selector"]["matchLabels"], dep["spec"]["selector"]["matchLabels"])
        self.assertEqual(pdb["apiVersion"], "policy/v1", "offline render assumes a current Kubernetes")

    def test_single_operator_without_leader_election(self):
        objs = self.objs("single-operator")
        dep = find(objs, "Deployment")
        self.assertEqual(dep["spec"]["replicas"], 1)
        args = container(dep)["args"]
        self.assertIn("--no-leader-election", args)
        self.assertFalse([a for a in args if a.startswith("--lease")])
        self.assertFalse([o for o in objs if o["kind"] == "Role" and "lease" in o["metadata"]["name"]])
        with self.assertRaisesRegex(helm.HelmError, "leaderElection"):
            render({"operator": {"replicas": 2, "leaderElection": {"enabled": False}}})

    def test_unload_hook(self):
        objs = self.objs("default")
        hooks = [o for o in objs if o["metadata"].get("annotations", {}).get("helm.sh/hook")]
        self.assertEqual(sorted((o["kind"], o["metadata"]["name"]) for o in hooks),
                         [("ClusterRole", "demo-bpfpoly-unload"), ("ClusterRoleBinding", "demo-bpfpoly-unload"),
                          ("Job", "demo-bpfpoly-unload"), ("ServiceAccount", "demo-bpfpoly-unload")])
        for o in hooks:
            ann = o["metadata"]["annotations"]
            self.assertEqual(ann["helm.sh/hook"], "pre-delete", o["kind"])
            self.assertEqual(ann["helm.sh/hook-delete-policy"], "before-hook-creation,hook-succeeded", o["kind"])
        # The identity, bound before the Job runs, may only read and delete programs.
        role = find(objs, "ClusterRole", "demo-bpfpoly-unload")
        self.assertEqual(rules_of(role), {("bpfpoly.io", "bpfpolyprograms"): {"get", "list", "delete"}})
        job = find(objs, "Job", "demo-bpfpoly-unload")
        self.assertLess(int(find(objs, "ServiceAccount", "demo-bpfpoly-unload")["metadata"]["annotations"]
                            ["helm.sh/hook-weight"]), int(job["metadata"]["annotations"]["helm.sh/hook-weight"]))
        c = container(job)
        self.assertEqual(c["command"], ["bpfpoly-operator"])
        self.assertEqual(c["args"], ["unload-all", "--timeout=120"])
        self.assertEqual(job["spec"]["template"]["spec"]["serviceAccountName"], "demo-bpfpoly-unload")
        self.assertFalse(c["securityContext"]["privileged"])
        self.assertEqual(c["securityContext"]["capabilities"], {"drop": ["ALL"]})
        off = objects_of(render({"uninstall": {"unloadPrograms": False}}))
        self.assertFalse([o for o in off if "unload" in o["metadata"]["name"]], "unloadPrograms=false: no hook")

    def test_names_and_overrides(self):
        objs = objects_of(render({"fullnameOverride": "bp", "operator": {"serviceAccount": {"name": "op-sa"}},
                                  "agent": {"serviceAccount": {"create": False, "name": "node-sa"}}}))
        self.assertEqual(find(objs, "Deployment")["metadata"]["name"], "bp-operator")
        self.assertEqual(find(objs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"], "op-sa")
        self.assertEqual(sorted(o["metadata"]["name"] for o in objs if o["kind"] == "ServiceAccount"),
                         ["bp-unload", "op-sa"])
        self.assertEqual(find(objs, "ClusterRoleBinding", "bp-agent")["subjects"][0]["name"], "node-sa")
        with self.assertRaisesRegex(helm.HelmError, "agent.serviceAccount.name is required"):
            render({"agent": {"serviceAccount": {"create": False, "name": ""}}})
        no_rbac = kinds(objects_of(render({"rbac": {"create": False}})))
        self.assertFalse({"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"} & set(no_rbac))

    # --- the agents' own-node ValidatingAdmissionPolicy (clusters serving it: >= 1.30) ---

    NODE_NAME_EXTRA = "request.userInfo.extra['authentication.kubernetes.io/node-name']"

    def vap_objs(self, values: dict[str, Any] | None = None, **kw: Any) -> list[dict[str, Any]]:
        return objects_of(render_for(values or {}, api_versions=[VAP_API], kube_version="v1.31.0", **kw))

    def test_own_node_policy(self):
        objs = self.vap_objs()
        vap = find(objs, "ValidatingAdmissionPolicy", "demo-bpfpoly-agent-own-node")
        vapb = find(objs, "ValidatingAdmissionPolicyBinding", "demo-bpfpoly-agent-own-node")
        for o in (vap, vapb):
            self.assertEqual(o["apiVersion"], "admissionregistration.k8s.io/v1")
            self.assertNotIn("namespace", o["metadata"], "cluster-scoped")
            self.assertEqual(o["metadata"]["labels"]["app.kubernetes.io/instance"], "demo")
            self.assertEqual(o["metadata"]["labels"]["app.kubernetes.io/component"], "agent")
        spec = vap["spec"]
        self.assertEqual(spec["failurePolicy"], "Fail")
        self.assertNotIn("paramKind", spec)
        [rule] = spec["matchConstraints"]["resourceRules"]
        self.assertEqual(rule["apiGroups"], ["bpfpoly.io"])
        self.assertEqual(rule["apiVersions"], ["*"])
        self.assertEqual(sorted(rule["operations"]), ["CREATE", "UPDATE"], "PATCH arrives as UPDATE (or CREATE)")
        self.assertEqual(sorted(rule["resources"]), ["bpfnodeprofiles", "bpfnodeprofiles/status",
                                                     "bpfnodestates", "bpfnodestates/status"])
        # Only the agents' requests are judged (the operator writes every node's objects).
        self.assertEqual(spec["matchConditions"], [{
            "name": "agent-service-account",
            "expression": "request.userInfo.username == 'system:serviceaccount:bpfpoly-system:demo-bpfpoly-agent'"}])
        has_extra, own_node = spec["validations"]
        for v in (has_extra, own_node):
            self.assertEqual(v["reason"], "Forbidden")
            self.assertTrue(v["message"].startswith("bpfpoly: "), v["message"])
            for expr in (v["expression"], v["messageExpression"]):
                self.assertEqual(cel_syntax_problems(expr), [])
            # The message names the node the object belongs to.
            self.assertIn("object.metadata.name", v["messageExpression"])
        # 1: a token without a node name (extra absent, or no node-name key) is denied.
        self.assertIn("has(request.userInfo.extra)", has_extra["expression"])
        self.assertIn("'authentication.kubernetes.io/node-name' in request.userInfo.extra", has_extra["expression"])
        self.assertIn("no node name", has_extra["message"])
        # 2: the token's node must be the object's name (exactly one value), guarded so that
        # a missing extra is reported by 1, not as an evaluation error.
        e = own_node["expression"]
        self.assertIn(f"size({self.NODE_NAME_EXTRA}) == 1", e)
        self.assertIn(f"{self.NODE_NAME_EXTRA}[0] == object.metadata.name", e)
        self.assertTrue(e.startswith("!has(request.userInfo.extra) || "
                                     "!('authentication.kubernetes.io/node-name' in request.userInfo.extra) || "), e)
        self.assertIn(f"{self.NODE_NAME_EXTRA}.join(", own_node["messageExpression"], "names the token's node")
        self.assertEqual(vapb["spec"], {"policyName": "demo-bpfpoly-agent-own-node", "validationActions": ["Deny"]})
        # Nothing else changes: every other object is the default render's.
        self.assertEqual([o for o in objs if o not in (vap, vapb)], self.objs("default"))

    def test_own_node_policy_names(self):
        objs = self.vap_objs({"fullnameOverride": "bp", "agent": {"serviceAccount": {"create": False, "name": "node-sa"}}},
                             namespace="ebpf")
        vap = find(objs, "ValidatingAdmissionPolicy", "bp-agent-own-node")
        self.assertEqual(vap["spec"]["matchConditions"][0]["expression"],
                         "request.userInfo.username == 'system:serviceaccount:ebpf:node-sa'")
        self.assertEqual(find(objs, "ValidatingAdmissionPolicyBinding", "bp-agent-own-node")["spec"]["policyName"],
                         "bp-agent-own-node")

    def test_own_node_policy_absent(self):
        policy_kinds = {"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}
        cases = {
            "value false": render_for({"agent": {"ownNodePolicy": False}}, api_versions=[VAP_API], kube_version="v1.31.0"),
            "offline default": render({}),
            "1.20": render_for({}, kube_version="v1.20.2"),
            # 1.20 serves admissionregistration.k8s.io/v1 (webhook configurations), not the kind.
            "group version only": render_for({}, api_versions=["admissionregistration.k8s.io/v1"], kube_version="v1.20.2"),
        }
        for label, rendered in cases.items():
            with self.subTest(label):
                self.assertFalse(policy_kinds & set(kinds(objects_of(rendered))))
                self.assertNotIn("ValidatingAdmissionPolicy", "".join(rendered.values()))
        # And on 1.20 the chart is exactly what it was.
        self.assertEqual(objects_of(render_for({}, kube_version="v1.20.2")),
                         objects_of(render_for({"agent": {"ownNodePolicy": False}}, kube_version="v1.20.2")))


# ========================================================================================
# Schema
# ========================================================================================

BAD_VALUES = [
    # wrong types
    ("operator.replicas string", {"operator": {"replicas": "2"}}, "/operator/replicas"),
    ("agent.hostNetwork string", {"agent": {"hostNetwork": "yes"}}, "/agent/hostNetwork"),
    ("image.tag number", {"image": {"tag": 1.2}}, "/image/tag"),
    ("dashboard.labelValue number", {"dashboard": {"labelValue": 1}}, "/dashboard/labelValue"),
    ("configMapNamespaces string", {"agent": {"configMapNamespaces": "ns1"}}, "/agent/configMapNamespaces"),
    ("nodeSelector value bool", {"agent": {"nodeSelector": {"ebpf": True}}}, "/agent/nodeSelector/ebpf"),
    ("tolerations object", {"agent": {"tolerations": {"operator": "Exists"}}}, "/agent/tolerations"),
    ("resources list", {"operator": {"resources": ["cpu"]}}, "/operator/resources"),
    ("metricsPort string", {"agent": {"metricsPort": "9464"}}, "/agent/metricsPort"),
    ("podMonitor.enabled string", {"metrics": {"podMonitor": {"enabled": "true"}}}, "/metrics/podMonitor/enabled"),
    ("extraArgs string", {"agent": {"extraArgs": "--debug"}}, "/agent/extraArgs"),
    ("ownNodePolicy string", {"agent": {"ownNodePolicy": "true"}}, "/agent/ownNodePolicy"),
    # unknown keys, at every level
    ("unknown top-level key", {"agnet": {"securityMode": "privileged"}}, "agnet"),
    ("unknown agent key", {"agent": {"securityContext": {"privileged": False}}}, "securityContext"),
    ("unknown operator key", {"operator": {"replica": 3}}, "replica"),
    ("unknown leaderElection key", {"operator": {"leaderElection": {"leaseDuration": 30}}}, "leaseDuration"),
    ("unknown image key", {"image": {"registry": "r.local"}}, "registry"),
    ("unknown metrics key", {"metrics": {"serviceMonitor": {"enabled": True}}}, "serviceMonitor"),
    ("unknown podMonitor key", {"metrics": {"podMonitor": {"enabled": True, "intervall": "1m"}}}, "intervall"),
    ("unknown dashboard key", {"dashboard": {"label": "grafana_dashboard"}}, "label"),
    ("unknown rbac key", {"rbac": {"pspEnabled": True}}, "pspEnabled"),
    ("unknown serviceAccount key", {"agent": {"serviceAccount": {"automount": False}}}, "automount"),
    ("unknown toleration key", {"agent": {"tolerations": [{"operatr": "Exists"}]}}, "operatr"),
    ("unknown resources key", {"agent": {"resources": {"request": {"cpu": "1"}}}}, "request"),
    ("unknown updateStrategy key", {"agent": {"updateStrategy": {"maxSurge": 1}}}, "maxSurge"),
    # bad enums and patterns
    ("securityMode enum", {"agent": {"securityMode": "root"}}, "/agent/securityMode"),
    ("securityMode case", {"agent": {"securityMode": "Privileged"}}, "/agent/securityMode"),
    ("pullPolicy enum", {"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    ("toleration operator enum", {"agent": {"tolerations": [{"operator": "Matches"}]}}, "/agent/tolerations/0/operator"),
    ("namespace not a DNS label", {"agent": {"configMapNamespaces": ["Bad_NS"]}}, "/agent/configMapNamespaces/0"),
    ("duplicate namespaces", {"agent": {"configMapNamespaces": ["a", "a"]}}, "/agent/configMapNamespaces"),
    ("bpffsRoot outside bpffs", {"agent": {"bpffsRoot": "/tmp/pins"}}, "/agent/bpffsRoot"),
    ("btfPath outside /sys/kernel/btf", {"agent": {"btfPath": "/boot/vmlinux"}}, "/agent/btfPath"),
    ("relative bytecode dir", {"agent": {"allowedBytecodeDirs": ["var/lib/bpfpoly"]}}, "/agent/allowedBytecodeDirs/0"),
    ("port out of range", {"operator": {"metricsPort": 70000}}, "/operator/metricsPort"),
    ("replicas zero", {"operator": {"replicas": 0}}, "/operator/replicas"),
    ("maxUnavailable 0%", {"agent": {"updateStrategy": {"maxUnavailable": "0%"}}}, "/agent/updateStrategy/maxUnavailable"),
    ("bad scrape interval", {"metrics": {"podMonitor": {"interval": "often"}}}, "/metrics/podMonitor/interval"),
    ("bad label key", {"dashboard": {"labelKey": "has space"}}, "/dashboard/labelKey"),
    ("bad quantity", {"agent": {"resources": {"limits": {"memory": "lots"}}}}, "/agent/resources/limits/memory"),
]


class quiet_stderr:
    """Silences file descriptor 2: Helm's Go code logs coalescing warnings there when a
    value has the wrong type, before the schema rejects it."""

    def __enter__(self):
        sys.stderr.flush()
        self.saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)

    def __exit__(self, *exc):
        os.dup2(self.saved, 2)
        os.close(self.saved)


class T3Schema(unittest.TestCase):
    def test_bad_values_rejected(self):
        with quiet_stderr():
            self._bad_values_rejected()

    def _bad_values_rejected(self):
        for label, values, where in BAD_VALUES:
            with self.subTest(label):
                with self.assertRaises(helm.HelmValuesError, msg=f"{label}: {values} was accepted") as cm:
                    CHART.validate_schema(values)
                self.assertIn(where, str(cm.exception), f"{label}: the error does not name {where}")
                # Rendering (what install and upgrade do) refuses them as well.
                with self.assertRaises(helm.HelmValuesError, msg=f"{label}: rendered anyway"):
                    render(values)

    def test_good_values_accepted(self):
        CHART.validate_schema({})
        for name, values in VALUE_SETS.items():
            with self.subTest(values=name):
                CHART.validate_schema(values)
        CHART.validate_schema({"global": {"imageRegistry": "x"}})  # what a parent chart passes down
        CHART.validate_schema({"agent": {"updateStrategy": {"maxUnavailable": "100%"}},
                               "operator": {"resources": {"limits": {"cpu": 2, "memory": "1.5Gi"}}}})

    def test_every_object_closes_additional_properties(self):
        schema = json.loads((CHART_DIR / "values.schema.json").read_text())
        # Objects whose keys are Kubernetes' own (affinity terms) or Helm's (global).
        free_form = {"/properties/global", "/definitions/affinity/properties/nodeAffinity",
                     "/definitions/affinity/properties/podAffinity",
                     "/definitions/affinity/properties/podAntiAffinity"}
        problems = []

        def walk(node: Any, path: str) -> None:
            if isinstance(node, dict):
                if node.get("type") == "object" and path not in free_form:
                    ap = node.get("additionalProperties")
                    if "properties" in node and ap is not False:
                        problems.append(f"{path}: has properties but does not set additionalProperties: false")
                    if "properties" not in node and not isinstance(ap, dict):
                        problems.append(f"{path}: a map without a schema for its values")
                for k, v in node.items():
                    walk(v, f"{path}/{k}")
            elif isinstance(node, list):
                for i, v in enumerate(node):
                    walk(v, f"{path}/{i}")

        walk(schema, "")
        self.assertEqual(problems, [])
        self.assertIs(schema["additionalProperties"], False)

    def test_values_yaml_and_schema_agree(self):
        schema = json.loads((CHART_DIR / "values.schema.json").read_text())
        declared = set(schema_paths(schema, schema))
        values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())

        def leaves(d: dict[str, Any], prefix: str = "") -> set[str]:
            out = set()
            for k, v in d.items():
                p = f"{prefix}.{k}" if prefix else k
                out.add(p)
                if isinstance(v, dict) and p in declared and any(x.startswith(p + ".") for x in declared):
                    out |= leaves(v, p)
            return out

        self.assertEqual(leaves(values), declared - {"global"})

    def test_readme_lists_every_value(self):
        schema = json.loads((CHART_DIR / "values.schema.json").read_text())
        readme = (CHART_DIR / "README.md").read_text()
        paths = schema_paths(schema, schema)
        leaves = [p for p in paths if p != "global" and not any(q.startswith(p + ".") for q in paths)]
        missing = [p for p in leaves if f"`{p}`" not in readme]
        self.assertEqual(missing, [], "charts/bpfpoly/README.md does not list these values")


# ========================================================================================
# Dashboard
# ========================================================================================


class T4Dashboard(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.text = (CHART_DIR / "dashboards" / "bpfpoly.json").read_text()
        cls.dash = json.loads(cls.text)
        cls.panels = [p for p in cls.dash["panels"] if p["type"] != "row"]

    def exprs(self) -> list[tuple[str, str]]:
        return [(p["title"], t["expr"]) for p in self.panels for t in p["targets"]]

    def test_parses_and_is_well_formed(self):
        self.assertEqual(self.dash["uid"], "bpfpoly-overview")
        ids = [p["id"] for p in self.dash["panels"]]
        self.assertEqual(len(ids), len(set(ids)), "panel ids must be unique")
        for p in self.panels:
            with self.subTest(panel=p["title"]):
                self.assertTrue(p["targets"], "a panel without queries")
                self.assertTrue(p.get("description"))
                g = p["gridPos"]
                self.assertLessEqual(g["x"] + g["w"], 24)
                self.assertEqual(p["datasource"]["uid"], "${datasource}")
                for t in p["targets"]:
                    e = t["expr"]
                    for o, c in ("()", "{}", "[]"):
                        self.assertEqual(e.count(o), e.count(c), f"unbalanced {o}{c} in {e}")
        names = [v["name"] for v in self.dash["templating"]["list"]]
        self.assertEqual(names, ["datasource", "program", "node"])

    def test_metric_names_are_the_designs(self):
        used: set[str] = set()
        for title, expr in self.exprs():
            names = promql_metric_names(expr)
            self.assertTrue(names, f"{title}: no metric in {expr}")
            self.assertLessEqual(names, ALLOWED_SERIES, f"{title}: {expr}")
            used |= names
        for var in self.dash["templating"]["list"]:
            if var["type"] == "query":
                m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", var["query"]["query"])
                self.assertTrue(m, var["query"])
                self.assertIn(m.group(1), ALLOWED_SERIES)
        self.assertEqual(REQUIRED_SERIES - used, set(), "metrics without a panel")
        # Every bpfpoly_* token anywhere in the JSON is a design name (no typo hides in a
        # legend or a description).
        for token in set(re.findall(r"bpfpoly_[a-z0-9_]+", self.text)):
            self.assertIn(token, ALLOWED_SERIES)

    def test_extractor(self):
        self.assertEqual(promql_metric_names(
            'histogram_quantile(0.99, sum by (le) (rate(a_bucket{node=~"$node"}[$__rate_interval])))'), {"a_bucket"})
        self.assertEqual(promql_metric_names('sum by (program) (rate(x[5m])) / on(program) group_left y'), {"x", "y"})
        self.assertEqual(promql_metric_names('max by (program, phase) (bpfpoly_nodes{program=~"$program"}) > 0'),
                         {"bpfpoly_nodes"})

    def test_required_panels(self):
        def panel_with(*needles: str) -> list[str]:
            return [title for title, e in self.exprs() if all(n in e for n in needles)]

        checks = {
            "programs per variant": ("bpfpoly_program_info", "variant"),
            "programs per node": ("bpfpoly_program_info", "node, program"),
            "variant fallbacks over time by stage": ("bpfpoly_variant_fallbacks_total", "by (stage)", "$__rate_interval"),
            "verifier rejections": ("bpfpoly_verifier_rejections_total",),
            "dispatch rate by key": ("rate(bpfpoly_dispatch_total", "key"),
            "share on the default path": ("bpfpoly_dispatch_default_total", "bpfpoly_dispatch_total", " / "),
            "handler degradations": ("bpfpoly_handler_degraded", "key"),
            "config degradations": ("bpfpoly_config_fallbacks", "field"),
            "load latency p50": ("histogram_quantile(0.5,", "bpfpoly_load_duration_seconds_bucket"),
            "load latency p99": ("histogram_quantile(0.99,", "bpfpoly_load_duration_seconds_bucket"),
            "kernel run time per program": ("bpfpoly_prog_run_seconds_total", "by (program)"),
            "run time per invocation": ("bpfpoly_prog_run_seconds_total", "bpfpoly_prog_runs_total"),
            "rollout paused": ("bpfpoly_rollout_paused",),
            "nodes per phase": ("bpfpoly_nodes", "phase"),
        }
        for what, needles in checks.items():
            with self.subTest(what):
                self.assertTrue(panel_with(*needles), f"no panel for {what}")


# ========================================================================================
# Real API server
# ========================================================================================


def cluster_reachable() -> str | None:
    if OFFLINE:
        return "BPFPOLY_CHART_OFFLINE=1"
    if not Path(KUBECONFIG).exists():
        return f"no kubeconfig at {KUBECONFIG}"
    cp = subprocess.run(["kubectl", "--kubeconfig", KUBECONFIG, "get", "--raw", "/readyz"], capture_output=True,
                        text=True, timeout=20)
    return None if cp.returncode == 0 else f"API server not ready: {cp.stderr.strip()}"


def delete_everything_in(namespaces: list[str]) -> None:
    """Deletes every object in these namespaces, then the namespaces. Without a
    controller-manager a deleted namespace stays Terminating; once nothing is left in it,
    its `kubernetes` finalizer (the namespace controller's) is cleared so it goes away."""
    existing = [ns for ns in namespaces if exists("namespace", ns, None)]
    if not existing:
        return
    resources = kubectl("api-resources", "--namespaced", "--verbs=list,delete", "-o", "name").stdout.split()
    resources = [r for r in resources if r not in ("events", "events.events.k8s.io")]
    for ns in existing:
        kubectl("delete", ",".join(resources), "--all", "-n", ns, "--wait=false", "--ignore-not-found", check=False,
                timeout=120)
    for ns in existing:
        kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found", check=False)
    for ns in existing:
        left = kubectl("get", ",".join(resources), "-n", ns, "-o", "name", "--ignore-not-found", check=False).stdout.split()
        left = [x for x in left if not x.startswith("event")]
        if left:
            print(f"[chart-test] namespace {ns} keeps objects: {left}; left Terminating", file=sys.stderr)
            continue
        cp = kubectl("get", "namespace", ns, "-o", "json", check=False)
        if cp.returncode != 0:
            continue
        nsobj = json.loads(cp.stdout)
        nsobj["spec"]["finalizers"] = []
        kubectl("replace", "--raw", f"/api/v1/namespaces/{ns}/finalize", "-f", "-", input=json.dumps(nsobj), check=False)


def delete_cluster_scoped(instance: str) -> None:
    for kind in ("clusterrolebindings", "clusterroles"):
        kubectl("delete", kind, "-l", f"app.kubernetes.io/instance={instance}", "--ignore-not-found", check=False)
    # Roles the release put in namespaces that outlive the run (the events Role in default).
    for kind in ("rolebindings", "roles"):
        kubectl("delete", kind, "-n", "default", "-l", f"app.kubernetes.io/instance={instance}", "--ignore-not-found",
                check=False)


def dry_run_apply(objs: list[dict[str, Any]]) -> subprocess.CompletedProcess:
    doc = {"apiVersion": "v1", "kind": "List", "items": objs}
    return kubectl("apply", "--dry-run=server", "-o", "name", "-f", "-", input=json.dumps(doc), check=False)


SKIP_SERVER = None  # computed once in main()


class T5ApiServer(unittest.TestCase):
    """Install, RBAC, upgrade and uninstall on the real API server. The tests run in name
    order and build on each other: one release for the whole class."""

    cfg: Any = None
    installed = False
    release: dict[str, Any] = {}
    manifest: list[dict[str, Any]] = []
    crds_before: set[str] = set()

    # No kubelet serves this API server, so the uninstall hook's Job would never run: it is
    # off here and exercised on the real node (e2e/scenarios/node_test.py).
    install_values = {"agent": {"configMapNamespaces": [NS_BC1]}, "uninstall": {"unloadPrograms": False}}
    upgrade_values = {"agent": {"configMapNamespaces": [NS_BC2], "securityMode": "capabilities"},
                      "operator": {"replicas": 3},
                      "dashboard": {"labelValue": "bpfpoly-upgraded"},
                      "uninstall": {"unloadPrograms": False}}

    @classmethod
    def setUpClass(cls):
        if SKIP_SERVER:
            raise unittest.SkipTest(SKIP_SERVER)
        for ns in NAMESPACES:
            kubectl("create", "namespace", ns)
            kubectl("label", "namespace", ns, f"bpfpoly.io/chart-test={RUN_ID}")
        cls.crds_before = {c for c in kubectl("get", "crd", "-o", "name").stdout.split() if "bpfpoly.io" in c}
        cls.cfg = helm.Config(kubeconfig_path=KUBECONFIG, namespace=NS)

    @classmethod
    def tearDownClass(cls):
        cls.clean_up()

    @classmethod
    def clean_up(cls):
        """Removes everything the class created; idempotent (also run on interruption)."""
        if cls.cfg is None:
            return
        try:
            if cls.installed:
                cls.cfg.uninstall(RELEASE, ignore_not_found=True)
                cls.installed = False
        finally:
            delete_cluster_scoped(RELEASE)
            delete_everything_in(NAMESPACES)
            cls.cfg.close()
            cls.cfg = None

    def fullname(self, suffix: str = "") -> str:
        return f"{RELEASE}-bpfpoly{suffix}"

    def server_render(self, values: dict[str, Any]) -> list[dict[str, Any]]:
        """The manifest of a server dry-run install: the chart sees the server's Kubernetes
        version (1.20), which an offline render does not. Nothing is stored."""
        rel = self.cfg.install(CHART, f"dry-{RUN_ID}", values, namespace=NS, dry_run="server")
        return manifest_objects(rel["manifest"])

    # --- server-side validation, independent of the release ---

    def test_00_every_value_set_passes_server_validation(self):
        for name, values in VALUE_SETS.items():
            with self.subTest(values=name):
                # Namespaces the value set names are mapped to this run's namespaces.
                v = json.loads(json.dumps(values)
                               .replace('"bytecode-a"', json.dumps(NS_BC1)).replace('"bytecode-b"', json.dumps(NS_BC2))
                               .replace('"monitoring"', json.dumps(NS)))
                if v.get("metrics", {}).get("podMonitor", {}).get("enabled"):
                    # This API server has no Prometheus Operator CRDs: Helm refuses the
                    # PodMonitor up front, and nothing is stored.
                    with self.assertRaisesRegex(helm.HelmError, "no matches for kind \"PodMonitor\""):
                        self.server_render(v)
                    v = merged(v, {"metrics": {"podMonitor": {"enabled": False}}})
                objs = self.server_render(v)
                pdbs = [o for o in objs if o["kind"] == "PodDisruptionBudget"]
                for pdb in pdbs:
                    self.assertEqual(pdb["apiVersion"], "policy/v1beta1", "1.20 serves policy/v1beta1 only")
                cp = dry_run_apply(objs)
                self.assertEqual(cp.returncode, 0, f"{name}: {cp.stderr}")
                self.assertEqual(len(cp.stdout.split()), len(objs), cp.stdout)
        self.assertEqual(self.cfg.list(all_states=True), [], "a dry run stored a release")

    def test_01_bidirectional_requires_privileged(self):
        """Why capabilities mode mounts /sys/fs/bpf HostToContainer: the API server refuses
        Bidirectional propagation to a container that is not privileged."""
        ds = find(self.server_render(VALUE_SETS["capabilities"]), "DaemonSet")
        cp = dry_run_apply([ds])
        self.assertEqual(cp.returncode, 0, cp.stderr)
        bad = copy.deepcopy(ds)
        for m in container(bad)["volumeMounts"]:
            if m["mountPath"] == "/sys/fs/bpf":
                m["mountPropagation"] = "Bidirectional"
        cp = dry_run_apply([bad])
        self.assertNotEqual(cp.returncode, 0)
        self.assertIn("Bidirectional mount propagation is available only to privileged containers", cp.stderr)

    # --- install ---

    def test_10_install(self):
        t0 = time.monotonic()
        rel = self.cfg.install(CHART, RELEASE, self.install_values, namespace=NS, timeout=120)
        type(self).installed = True
        self.assertEqual(rel["status"], "deployed")
        self.assertEqual(rel["revision"], 1)
        self.assertEqual(rel["app_version"], APP_VERSION)
        self.assertIn("bpfpoly-operator explain", rel["notes"])
        self.assertLess(time.monotonic() - t0, 60)
        type(self).manifest = manifest_objects(rel["manifest"])
        self.assertGreaterEqual(len(self.manifest), 13)

    def test_11_objects_exist(self):
        self.assertTrue(self.installed, "install failed")
        for o in self.manifest:
            md = o["metadata"]
            with self.subTest(f"{o['kind']} {md['name']}"):
                live = get_json(kind_ref(o), md["name"], md.get("namespace"))
                self.assertEqual(live["metadata"]["labels"]["app.kubernetes.io/instance"], RELEASE)
        # Fields the 1.20 API server kept as rendered (nothing pruned or defaulted away).
        ds = get_json("daemonset.apps", self.fullname("-agent"), NS)
        m = mounts(ds)
        self.assertEqual(m["/sys/fs/bpf"]["mountPropagation"], "Bidirectional")
        self.assertIs(m["/sys/kernel/btf"]["readOnly"], True)
        self.assertIs(container(ds)["securityContext"]["privileged"], True)
        dep = get_json("deployment.apps", self.fullname("-operator"), NS)
        sc = container(dep)["securityContext"]
        self.assertEqual((sc["runAsNonRoot"], sc["readOnlyRootFilesystem"], sc["allowPrivilegeEscalation"],
                          sc["capabilities"]), (True, True, False, {"drop": ["ALL"]}))
        self.assertEqual(dep["spec"]["replicas"], 2)
        self.assertEqual(dep["spec"]["template"]["spec"]["securityContext"]["seccompProfile"], {"type": "RuntimeDefault"})
        # The CRDs from crds/ are there (installed now, or already present: Helm skips those).
        crds = {c for c in kubectl("get", "crd", "-o", "name").stdout.split() if "bpfpoly.io" in c}
        self.assertEqual(crds, {"customresourcedefinition.apiextensions.k8s.io/" + n for n in
                                ("bpfpolyprograms.bpfpoly.io", "bpfnodestates.bpfpoly.io", "bpfnodeprofiles.bpfpoly.io")})
        self.assertTrue(exists("role.rbac.authorization.k8s.io", self.fullname("-agent-bytecode"), NS_BC1))
        self.assertTrue(exists("role.rbac.authorization.k8s.io", self.fullname("-events"), "default"))
        self.assertEqual([r["name"] for r in self.cfg.list(name_filter=f"^{RELEASE}$")], [RELEASE])

    # --- RBAC, on the server, as the ServiceAccounts ---

    def check_matrix(self, matrix: list[tuple[bool, str, str, str | None, str | None, str | None]]) -> None:
        def ask(row):
            want, user, verb, resource, ns, sub, *name = row
            return row, can_i(user, verb, resource, ns, sub, name[0] if name else None)

        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(ask, matrix))
        wrong = [f"{'CAN' if got else 'CANNOT'} {r[2]} {r[3]}{'/' + r[5] if r[5] else ''}"
                 f"{' ' + r[6] if len(r) > 6 else ''} in {r[4] or 'cluster'} as {r[1].split(':')[-1]}"
                 for r, got in results if got != r[0]]
        self.assertEqual(wrong, [])

    def test_20_rbac_agent(self):
        self.assertTrue(self.installed, "install failed")
        a = sa(self.fullname("-agent"))
        bpp, st, pr = "bpfpolyprograms.bpfpoly.io", "bpfnodestates.bpfpoly.io", "bpfnodeprofiles.bpfpoly.io"
        rows = [
            # BpfPolyProgram: read-only
            *[(True, a, v, bpp, None, None) for v in ("get", "list", "watch")],
            *[(False, a, v, bpp, None, None) for v in ("create", "update", "patch", "delete", "deletecollection")],
            *[(False, a, v, bpp, None, "status") for v in ("update", "patch")],
            (False, a, "update", bpp, None, "finalizers"),
            # its node's state (status only: what to load is the operator's) and profile
            # (RBAC cannot narrow either to its own node)
            *[(True, a, v, r, None, None) for r in (st, pr) for v in ("get", "list", "watch")],
            *[(False, a, v, st, None, None) for v in ("create", "patch", "update", "delete")],
            *[(True, a, v, pr, None, None) for v in ("create", "patch")],
            *[(False, a, v, pr, None, None) for v in ("delete", "update", "deletecollection")],
            *[(True, a, v, r, None, "status") for r in (st, pr) for v in ("patch", "update")],
            (True, a, "get", "nodes", None, None), (False, a, "list", "nodes", None, None),
            (False, a, "patch", "nodes", None, None),
            # Secrets: nowhere
            *[(False, a, v, "secrets", ns, None) for v in ("get", "list", "watch") for ns in (NS, NS_BC1, "default", "kube-system", "*")],
            # ConfigMaps: only in the listed namespaces, read-only
            *[(True, a, v, "configmaps", NS_BC1, None) for v in ("get", "list", "watch")],
            *[(False, a, v, "configmaps", NS_BC1, None) for v in ("create", "update", "patch", "delete")],
            *[(False, a, "get", "configmaps", ns, None) for ns in (NS, NS_BC2, NS_OTHER, "default", "kube-system")],
            (False, a, "list", "configmaps", "*", None),
            # Events: create and patch, in the events namespace
            *[(True, a, v, "events.events.k8s.io", "default", None) for v in ("create", "patch")],
            *[(False, a, v, "events.events.k8s.io", "default", None) for v in ("delete", "list")],
            (False, a, "create", "events.events.k8s.io", NS_OTHER, None),
            # nothing else
            *[(False, a, "create", r, NS, None) for r in ("pods", "daemonsets.apps", "leases.coordination.k8s.io")],
            (False, a, "create", "clusterrolebindings.rbac.authorization.k8s.io", None, None),
            (False, a, "impersonate", "serviceaccounts", NS, None),
            # its liveness Lease, in the lease namespace only
            *[(True, a, v, "leases.coordination.k8s.io", LEASE_NS, None) for v in ("get", "create", "update", "patch")],
            *[(False, a, v, "leases.coordination.k8s.io", LEASE_NS, None) for v in ("list", "watch", "delete")],
            (False, a, "patch", "leases.coordination.k8s.io", "kube-system", None),
        ]
        self.check_matrix(rows)

    def test_21_rbac_operator(self):
        self.assertTrue(self.installed, "install failed")
        o = sa(self.fullname("-operator"))
        bpp, st, pr = "bpfpolyprograms.bpfpoly.io", "bpfnodestates.bpfpoly.io", "bpfnodeprofiles.bpfpoly.io"
        lease = "leases.coordination.k8s.io"
        rows = [
            *[(True, o, v, bpp, None, None) for v in ("get", "list", "watch", "patch", "update")],
            *[(False, o, v, bpp, None, None) for v in ("create", "delete", "deletecollection")],
            *[(True, o, v, bpp, None, "status") for v in ("patch", "update")],
            (True, o, "update", bpp, None, "finalizers"),
            *[(True, o, v, r, None, None) for r in (st, pr) for v in ("get", "list", "watch", "create", "patch", "delete")],
            *[(False, o, "deletecollection", r, None, None) for r in (st, pr)],
            *[(True, o, v, "nodes", None, None) for v in ("get", "list", "watch")],
            *[(False, o, v, "nodes", None, None) for v in ("patch", "update", "delete")],
            # its Lease, in its namespace
            (True, o, "create", lease, NS, None),
            *[(True, o, v, lease, NS, None, "bpfpoly-operator") for v in ("get", "update", "patch")],
            *[(False, o, v, lease, NS, None, "kube-controller-manager") for v in ("get", "update", "patch")],
            (False, o, "delete", lease, NS, None, "bpfpoly-operator"),
            (False, o, "create", lease, "kube-system", None),
            # the agents' liveness Leases: read-only
            *[(True, o, v, lease, LEASE_NS, None) for v in ("get", "list", "watch")],
            *[(False, o, v, lease, LEASE_NS, None) for v in ("create", "patch", "update", "delete")],
            # Events
            *[(True, o, v, "events.events.k8s.io", "default", None) for v in ("create", "patch")],
            (False, o, "delete", "events.events.k8s.io", "default", None),
            # Secrets and ConfigMaps: nowhere
            *[(False, o, v, "secrets", ns, None) for v in ("get", "list") for ns in (NS, "default", "kube-system", "*")],
            *[(False, o, "get", "configmaps", ns, None) for ns in (NS, NS_BC1, "default")],
            (False, o, "create", "pods", NS, None),
        ]
        self.check_matrix(rows)

    def test_22_rbac_exact_rule_lists(self):
        """`kubectl auth can-i --list` as each ServiceAccount, minus what every authenticated
        user gets, is exactly the expected rule list, namespace by namespace."""
        self.assertTrue(self.installed, "install failed")
        nobody = sa("nobody")

        def expected(cluster: dict, *namespaced: dict) -> set[tuple[str, str, str]]:
            out = set()
            for rules in (cluster, *namespaced):
                for (group, res), verbs in rules.items():
                    base, _, sub = res.partition("/")
                    name = f"{base}.{group}" if group else base
                    if sub:
                        name += f"/{sub}"
                    out |= {(name, "", v) for v in verbs}
            return out

        lease_named = {("leases.coordination.k8s.io", "bpfpoly-operator", v) for v in ("get", "update", "patch")}
        cases = [
            ("operator", NS, expected(OPERATOR_CLUSTER_RULES, {("coordination.k8s.io", "leases"): {"create"}}) | lease_named),
            ("operator", "default", expected(OPERATOR_CLUSTER_RULES, EVENTS_RULES)),
            ("operator", NS_BC1, expected(OPERATOR_CLUSTER_RULES)),
            ("agent", NS, expected(AGENT_CLUSTER_RULES)),
            ("agent", "default", expected(AGENT_CLUSTER_RULES, EVENTS_RULES)),
            ("agent", NS_BC1, expected(AGENT_CLUSTER_RULES, CONFIGMAP_RULES)),
            ("agent", NS_OTHER, expected(AGENT_CLUSTER_RULES)),
            ("operator", LEASE_NS, expected(OPERATOR_CLUSTER_RULES, OPERATOR_LEASE_RULES)),
            ("agent", LEASE_NS, expected(AGENT_CLUSTER_RULES, AGENT_LEASE_RULES)),
        ]
        baselines = {ns: rules_list(nobody, ns) for ns in {c[1] for c in cases}}
        for who, ns, want in cases:
            with self.subTest(f"{who} in {ns}"):
                got = rules_list(sa(self.fullname(f"-{who}")), ns) - baselines[ns]
                self.assertEqual(got, want)

    # --- upgrade ---

    def test_30_upgrade(self):
        self.assertTrue(self.installed, "install failed")
        rel = self.cfg.upgrade(CHART, RELEASE, self.upgrade_values, namespace=NS, timeout=120)
        self.assertEqual((rel["status"], rel["revision"]), ("deployed", 2))
        ds = get_json("daemonset.apps", self.fullname("-agent"), NS)
        sc = container(ds)["securityContext"]
        self.assertIs(sc["privileged"], False)
        self.assertEqual(sc["capabilities"], {"drop": ["ALL"], "add": AGENT_CAPS})
        self.assertEqual(mounts(ds)["/sys/fs/bpf"]["mountPropagation"], "HostToContainer")
        self.assertIn(f"--configmap-namespaces={NS_BC2}", container(ds)["args"])
        self.assertEqual(ds["metadata"]["generation"], 2)
        dep = get_json("deployment.apps", self.fullname("-operator"), NS)
        self.assertEqual(dep["spec"]["replicas"], 3)
        cm = get_json("configmap", self.fullname("-dashboard"), NS)
        self.assertEqual(cm["metadata"]["labels"]["grafana_dashboard"], "bpfpoly-upgraded")
        # The ConfigMap Role moved from NS_BC1 to NS_BC2.
        self.assertTrue(exists("role.rbac.authorization.k8s.io", self.fullname("-agent-bytecode"), NS_BC2))
        self.assertFalse(exists("role.rbac.authorization.k8s.io", self.fullname("-agent-bytecode"), NS_BC1))
        self.assertFalse(exists("rolebinding.rbac.authorization.k8s.io", self.fullname("-agent-bytecode"), NS_BC1))
        a = sa(self.fullname("-agent"))
        self.check_matrix([(True, a, "get", "configmaps", NS_BC2, None), (True, a, "list", "configmaps", NS_BC2, None),
                           (False, a, "get", "configmaps", NS_BC1, None), (False, a, "get", "secrets", NS_BC2, None)])
        type(self).manifest = manifest_objects(rel["manifest"])
        history = self.cfg.history(RELEASE)
        self.assertEqual([h["revision"] for h in history], [1, 2])

    def test_31_upgrade_rejects_bad_values(self):
        self.assertTrue(self.installed, "install failed")
        with self.assertRaises(helm.HelmError):
            self.cfg.upgrade(CHART, RELEASE, {"agent": {"securityMode": "root"}}, namespace=NS)
        self.assertEqual(self.cfg.status(RELEASE)["revision"], 2, "a refused upgrade left a revision")

    # --- uninstall ---

    def test_40_uninstall(self):
        self.assertTrue(self.installed, "install failed")
        self.cfg.uninstall(RELEASE, timeout=120)
        type(self).installed = False
        for o in self.manifest:
            md = o["metadata"]
            with self.subTest(f"{o['kind']} {md['name']}"):
                self.assertFalse(exists(kind_ref(o), md["name"], md.get("namespace")), "still there after uninstall")
        for kind in ("clusterroles", "clusterrolebindings"):
            left = kubectl("get", kind, "-l", f"app.kubernetes.io/instance={RELEASE}", "-o", "name").stdout.split()
            self.assertEqual(left, [])
        # Helm's release records (Secrets in the release namespace) are gone too.
        left = kubectl("get", "secrets", "-n", NS, "-l", f"owner=helm,name={RELEASE}", "-o", "name").stdout.split()
        self.assertEqual(left, [])
        self.assertEqual(self.cfg.list(name_filter=f"^{RELEASE}$", all_states=True), [])
        # CRDs in crds/ are never deleted by Helm (custom resources would go with them).
        crds = {c for c in kubectl("get", "crd", "-o", "name").stdout.split() if "bpfpoly.io" in c}
        self.assertEqual(len(crds), 3, crds)
        self.assertLessEqual(self.crds_before, crds)
        # The ServiceAccounts are gone, so nothing can act as them any more.
        self.assertFalse(can_i(sa(self.fullname("-operator")), "patch", "bpfnodestates.bpfpoly.io"))


# ========================================================================================
# runner
# ========================================================================================


class TimedResult(unittest.TextTestResult):
    """One line per test: outcome, time, name; failed subtests listed under it."""

    outcomes: dict[str, str] = {}

    def startTest(self, test):
        self._t0 = time.monotonic()
        self._outcome = "ok"
        self._notes: list[str] = []
        unittest.TestResult.startTest(self, test)

    def stopTest(self, test):
        unittest.TestResult.stopTest(self, test)
        name = test.id().split(".", 1)[1]
        TimedResult.outcomes[name] = self._outcome
        self.stream.writeln(f"{self._outcome:<5} {time.monotonic() - self._t0:7.2f} s  {name}")
        for note in self._notes:
            self.stream.writeln(f"        {note}")
        self.stream.flush()

    def addSuccess(self, test):
        unittest.TestResult.addSuccess(self, test)

    def addFailure(self, test, err):
        unittest.TestResult.addFailure(self, test, err)
        self._outcome = "FAIL"

    def addError(self, test, err):
        unittest.TestResult.addError(self, test, err)
        if not hasattr(self, "_t0"):  # setUpClass/tearDownClass errors have no test of their own
            self.stream.writeln(f"ERROR in {test}")
            TimedResult.outcomes[str(test)] = "ERROR"
            return
        self._outcome = "ERROR"

    def addSkip(self, test, reason):
        unittest.TestResult.addSkip(self, test, reason)
        if isinstance(test, unittest.TestCase) and hasattr(self, "_outcome"):
            self._outcome = "skip"
            self._notes.append(reason)
        else:
            self.stream.writeln(f"skip  {test}: {reason}")

    def addSubTest(self, test, subtest, err):
        unittest.TestResult.addSubTest(self, test, subtest, err)
        if err is not None:
            self._outcome = "FAIL"
            self._notes.append(f"subtest failed: {subtest._subDescription()}")


def main() -> int:
    global SKIP_SERVER
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", action="append", default=[], help="only tests whose id contains this (repeatable)")
    args = ap.parse_args()
    SKIP_SERVER = cluster_reachable()
    if SKIP_SERVER and not OFFLINE:
        print(f"[chart-test] ERROR: {SKIP_SERVER} (KUBECONFIG={KUBECONFIG})", file=sys.stderr)
        return 2
    print(f"[chart-test] chart {CHART.name} {CHART.version} (app {APP_VERSION}), Helm SDK {helm.helm_sdk_version()}, "
          f"release {RELEASE} in {NS}" + ("" if not SKIP_SERVER else f"; API-server tests skipped: {SKIP_SERVER}"))
    loader = unittest.TestLoader()
    if args.k:
        loader.testNamePatterns = [f"*{k}*" for k in args.k]
    suite = loader.loadTestsFromModule(sys.modules[__name__])
    t0 = time.monotonic()
    # SIGTERM (a CI timeout) unwinds like Ctrl-C, so the cleanup below runs.
    def on_sigterm(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        result = unittest.TextTestRunner(stream=sys.stdout, verbosity=0, resultclass=TimedResult).run(suite)
    except KeyboardInterrupt:
        print("[chart-test] interrupted: cleaning up", file=sys.stderr)
        T5ApiServer.clean_up()
        return 130
    outcomes = list(TimedResult.outcomes.values())
    passed = outcomes.count("ok")
    failed = outcomes.count("FAIL") + outcomes.count("ERROR")
    skipped = outcomes.count("skip")
    print(f"{passed} passed, {failed} failed" + (f", {skipped} skipped" if skipped else "")
          + f" in {time.monotonic() - t0:.1f} s")
    return 0 if failed == 0 and result.wasSuccessful() and passed > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
