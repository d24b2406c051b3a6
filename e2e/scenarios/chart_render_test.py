"""Render tests of the Helm chart: the default values and other value sets, asserted field
by field (run by chart_test.py)."""

from __future__ import annotations

from chart_support import *  # noqa: F401,F403  (the chart, value sets, helpers)



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
