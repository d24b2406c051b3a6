"""Lint, schema and dashboard tests of the Helm chart (run by chart_test.py)."""

from __future__ import annotations

from chart_support import *  # noqa: F401,F403  (the chart, value sets, helpers)

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
