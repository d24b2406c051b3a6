"""The Helm chart on the real API server: server-side validation, install, RBAC as the
ServiceAccounts, upgrade and uninstall (run by chart_test.py)."""

from __future__ import annotations

from chart_support import *  # noqa: F401,F403  (the chart, value sets, helpers)

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
