"""What the chart tests share (chart_test.py runs them): the chart, the value sets, the
expected RBAC and metric names, rendering with the Helm SDK, and kubectl helpers."""

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
