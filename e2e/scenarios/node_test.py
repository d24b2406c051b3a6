"""The node scenario: the chart installed with the Helm SDK (helm-python-sdk, Helm 4) on a real
kubelet node (e2e/env/node.sh: containerd, runc, CNI bridge, kube-proxy, controller-manager,
scheduler), from the bpfpoly image built offline (e2e/env/build-image.sh). Nothing here is
simulated (except Prometheus's Pod discovery, see discovered_pods: Debian's Prometheus has no
Kubernetes discovery): the operator and the agent run as Pods, the agent loads programs into this
machine's kernel from inside its container, and frames sent on a veth pair are counted by them.

Run by e2e/scenarios/node-test.sh (`make node-test`, part of `make test`), as root. The tests run in
name order and build on each other; each failure names the Pod and prints its logs.

Environment (set by node-test.sh): KUBECONFIG, BPFPOLY_NODE_TAG1 / BPFPOLY_NODE_TAG2 (two tags
of the image, imported into the node's containerd), BPFPOLY_NODE_METRICS_PORT (the agent's
host-network metrics port), BPFPOLY_NODE_BPFFS (the agent's bpffs root).
"""

import time
import unittest

from node_support import *  # noqa: F401,F403  (constants and helpers of the scenario)

# --- the scenario ------------------------------------------------------------------------

class PodFailure(AssertionError):
    """Every assertion that fails in the scenario says which Pods are not Ready and prints
    their state, Events and logs (and the last lines of the Ready ones)."""

    def __init__(self, msg=""):
        super().__init__(f"{msg}{pod_report()}")


class NodeScenario(unittest.TestCase):
    installed = False
    failureException = PodFailure

    @classmethod
    def setUpClass(cls):
        if os.geteuid() != 0:
            raise AssertionError("the node scenario loads eBPF programs and sends raw frames: run it as root")
        # The chart's default agent.allowedBytecodeDirs, a DirectoryOrCreate hostPath: removed
        # at the end if the Pods created it.
        cls.var_lib_existed = os.path.exists(VAR_LIB)
        node = kjson("get", "node", NODE)
        ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
        if not ready or ready[0]["status"] != "True":
            raise AssertionError(f"node {NODE} is not Ready: {ready}")
        for a, b in VETHS:
            if subprocess.run(["ip", "link", "show", a], capture_output=True).returncode != 0:
                sh("ip", "link", "add", a, "type", "veth", "peer", "name", b)
            for d in (a, b):
                sh("sysctl", "-q", "-w", f"net.ipv6.conf.{d}.disable_ipv6=1")
                sh("ip", "link", "set", d, "up")

    @classmethod
    def tearDownClass(cls):
        if cls.installed:  # a failed run still leaves nothing behind
            for name in ("node-classifier", "node-classifier-caps"):
                kubectl("delete", "bpp", name, "--ignore-not-found", "--wait=true", "--timeout=60s", check=False)
            try:
                helm_cfg().uninstall(RELEASE, timeout=120, ignore_not_found=True)
            except Exception as e:  # noqa: BLE001 (reported, the run has failed already)
                print(f"cleanup: helm uninstall: {e}")
        for a, _ in VETHS:
            subprocess.run(["ip", "link", "del", a], capture_output=True)
        if not cls.var_lib_existed and os.path.isdir(VAR_LIB) and not os.listdir(VAR_LIB):
            os.rmdir(VAR_LIB)
        # The agent's emptied bpffs root (directories only: a pin left there stays, and the
        # uninstall test has failed on it).
        if os.path.isdir(BPFFS):
            for root, dirs, files in os.walk(BPFFS, topdown=False):
                if not files:
                    try:
                        os.rmdir(root)
                    except OSError:
                        pass

    def check(self, cond, msg):
        if not cond:
            self.fail(msg)

    def wait(self, what, fn, timeout=120, interval=0.5):
        try:
            return wait(what, fn, timeout, interval)
        except PodFailure:
            raise
        except AssertionError as e:
            self.fail(str(e))

    def wait_rollout(self, tag: str, mode: str):
        def done():
            dep = kjson("get", "deploy", "-n", NS, f"{RELEASE}-operator")
            ds = kjson("get", "ds", "-n", NS, f"{RELEASE}-agent")
            ops, agents = pods("operator"), pods("agent")
            image = f"bpfpoly/bpfpoly:{tag}"
            return (dep["status"].get("readyReplicas") == 2 and dep["status"].get("updatedReplicas") == 2
                    and ds["status"].get("numberReady") == 1 and ds["status"].get("updatedNumberScheduled") == 1
                    and len(ops) == 2 and len(agents) == 1
                    and all(pod_ready(p) and p["spec"]["containers"][0]["image"] == image for p in ops + agents)
                    and (ops, agents))
        ops, agents = self.wait(f"operator 2/2 and agent 1/1 Ready on {tag}", done, timeout=180)
        sc = agents[0]["spec"]["containers"][0]["securityContext"]
        self.assertEqual(bool(sc.get("privileged")), mode == "privileged", f"agent securityContext {sc}")
        return ops, agents[0]

    # 1. helm install: Pods Running and Ready, probes answering, one leader.
    def test_10_install(self):
        t0 = time.time()
        try:
            rel = helm_cfg().install(CHART, RELEASE, values(TAG1, "privileged"), namespace=NS,
                                     create_namespace=True, timeout=120)
        except helm.HelmError as e:
            self.fail(f"helm install: {e}")
        finally:
            type(self).installed = True  # a half-done install is uninstalled too
        self.assertEqual(rel["info"]["status"] if "info" in rel else rel.get("status"), "deployed")
        ops, agent = self.wait_rollout(TAG1, "privileged")
        print(f"\n  install -> all Pods Ready: {time.time() - t0:.1f} s", flush=True)
        self.assertEqual(agent["spec"]["nodeName"], NODE)
        self.assertTrue(agent["spec"]["hostNetwork"])
        # The probes' endpoints answer (the agent on the host network, the operators on theirs).
        for path in ("/healthz", "/readyz"):
            with urllib.request.urlopen(f"http://127.0.0.1:{AGENT_PORT}{path}", timeout=3) as r:
                self.assertEqual(r.status, 200, f"agent {agent['metadata']['name']} {path}")
        for p in ops:
            with urllib.request.urlopen(f"http://{p['status']['podIP']}:9465/healthz", timeout=3) as r:
                self.assertEqual(r.status, 200, f"operator {p['metadata']['name']} /healthz")
        holder = self.wait("an operator holding the Lease", lease_holder, timeout=60)
        self.assertIn(holder, [p["metadata"]["name"] for p in ops], "the leader is one of the two Pods")
        # The agent publishes its profile from inside the Pod.
        prof = self.wait("the node profile", lambda: kjson("get", "bnp", NODE).get("status"), timeout=60)
        self.assertEqual(prof["kernel"]["release"], os.uname().release)

    # 2. A program applied with kubectl is loaded by the agent inside its container.
    def test_20_program_loaded_from_the_privileged_container(self):
        kubectl("apply", "-f", "-", stdin=program("node-classifier", "bpn0"))
        s = self.wait("node-classifier Loaded on local", lambda: loaded("node-classifier"), timeout=90)
        self.assertEqual(s["variant"], "xdp-tailcall")
        self.assertTrue(set(s["programIds"]) <= bpftool_ids("prog"), f"{s['programIds']} not all in the kernel")
        self.assertIn(xdp_prog("bpn0"), s["programIds"], "the entry program is attached to bpn0")
        pins = os.path.join(BPFFS, "node-classifier")
        self.assertTrue(os.path.isdir(pins) and os.listdir(pins), f"pins under {pins} (visible on the host)")
        procs = agent_processes()
        self.check(procs and all("kubepods" in cg for _, cg in procs),
                   f"every agent with --bpffs-root={BPFFS} runs in a Pod's cgroup (kubepods): {procs}")
        agent = pods("agent")[0]["metadata"]["name"]
        log = kubectl("logs", "-n", NS, agent)
        self.check("node-classifier" in log and "xdp-tailcall running" in log,
                   f"agent Pod {agent} logs the load of node-classifier")
        c0 = self.wait("the dispatch counter", lambda: udp_count("node-classifier") is not None
                       and (udp_count("node-classifier"),), timeout=30)[0]
        send("bpn1", 200)
        self.wait("200 UDP frames counted", lambda: udp_count("node-classifier") == c0 + 200, timeout=20)

    # 3. The agent Pod deleted: programs keep running and are adopted, no second attach.
    def test_30_agent_pod_delete_keeps_programs(self):
        before = loaded("node-classifier")
        self.assertIsNotNone(before, "node-classifier loaded before")
        old = pods("agent")[0]["metadata"]["name"]
        c0 = udp_count("node-classifier")
        with Traffic("bpn1", "bpn0") as tr:
            kubectl("delete", "pod", "-n", NS, old, "--wait=false")

            def new_agent_ready():
                ps = [p for p in pods("agent") if p["metadata"]["name"] != old]
                return ps and pod_ready(ps[0]) and ps[0]

            new = self.wait("a new agent Pod Ready", new_agent_ready, timeout=120)
            self.wait("the new agent reporting node-classifier Loaded",
                      lambda: (loaded("node-classifier") or {}).get("observedGeneration") == before["observedGeneration"]
                      and udp_count("node-classifier") is not None, timeout=60)
            time.sleep(1)
        after = loaded("node-classifier")
        self.assertEqual(tr.attached, {before["programIds"][0]}, f"one XDP program on bpn0 throughout: {tr.attached}")
        self.assertEqual(after["programIds"], before["programIds"], "adopted: the same kernel programs")
        # Every frame sent while the agent was away was counted by the running program.
        self.wait(f"all {tr.sent} frames sent during the restart counted",
                  lambda: udp_count("node-classifier") == c0 + tr.sent, timeout=20)
        log = kubectl("logs", "-n", NS, new["metadata"]["name"])
        self.check("adopt" in log.lower(), f"agent Pod {new['metadata']['name']} logs the adoption")

    # 4. The leading operator Pod deleted: the standby takes over.
    def test_40_leader_delete_standby_takes_over(self):
        leader = lease_holder()
        standby = [p["metadata"]["name"] for p in pods("operator") if p["metadata"]["name"] != leader]
        self.assertEqual(len(standby), 1, f"one standby beside leader {leader}")
        transitions = kjson("get", "lease", "-n", NS, "bpfpoly-operator")["spec"].get("leaseTransitions", 0)
        t0 = time.time()
        kubectl("delete", "pod", "-n", NS, leader, "--wait=false")
        # The deleted leader releases the Lease on SIGTERM (operator/src/leader.rs) and the
        # standby, polling four times a second, takes it: long before the 10 s term would have
        # run out, and before the Deployment's replacement Pod has started.
        holder = self.wait("another operator Pod holding the Lease",
                           lambda: (lambda h: h if h and h != leader else None)(lease_holder()), timeout=60,
                           interval=0.1)
        took = time.time() - t0
        live = [p["metadata"]["name"] for p in pods("operator")]
        self.check(holder in live, f"the new leader {holder} is a live operator Pod ({live})")
        who = "the standby" if holder == standby[0] else "the replacement Pod"
        print(f"\n  leader {leader} deleted -> {who} {holder} leads after {took:.1f} s (lease term 10 s)",
              flush=True)
        self.assertEqual(holder, standby[0], f"the standby {standby[0]} took over (not {who} {holder})")
        self.assertLess(took, 4.0, "the released Lease was taken at once, not when its 10 s term ran out")
        self.assertEqual(kjson("get", "lease", "-n", NS, "bpfpoly-operator")["spec"].get("leaseTransitions"),
                         transitions + 1, "one transition: released, then taken")
        # The new leader reconciles: a change of the program reaches the node.
        gen = kjson("get", "bpp", "node-classifier")["metadata"]["generation"]
        kubectl("patch", "bpp", "node-classifier", "--type=merge", "-p",
                '{"spec":{"rollout":{"maxUnavailable":"50%"}}}')
        new_gen = kjson("get", "bpp", "node-classifier")["metadata"]["generation"]
        self.assertGreater(new_gen, gen)
        self.wait("the new leader's status for the new generation",
                  lambda: kjson("get", "bpp", "node-classifier").get("status", {}).get("observedGeneration") == new_gen,
                  timeout=60)
        self.wait("2 operator Pods Ready again", lambda: len([p for p in pods("operator") if pod_ready(p)]) == 2,
                  timeout=120)

    # 5. helm upgrade to a second image tag and the capabilities mode: make-before-break, and a
    #    program loaded by the agent running with capabilities only.
    def test_50_upgrade_to_second_tag_and_capabilities(self):
        before = loaded("node-classifier")
        c0 = udp_count("node-classifier")
        with Traffic("bpn1", "bpn0") as tr:
            try:
                helm_cfg().upgrade(CHART, RELEASE, values(TAG2, "capabilities"), namespace=NS, timeout=120)
            except helm.HelmError as e:
                self.fail(f"helm upgrade: {e}")
            self.wait_rollout(TAG2, "capabilities")
            self.wait("node-classifier Loaded under the new agent",
                      lambda: loaded("node-classifier") and udp_count("node-classifier") is not None, timeout=60)
            time.sleep(1)
        self.assertEqual(tr.attached, {before["programIds"][0]}, f"the same XDP program on bpn0 throughout: {tr.attached}")
        self.assertEqual(loaded("node-classifier")["programIds"], before["programIds"], "adopted, not reloaded")
        self.wait(f"all {tr.sent} frames sent during the upgrade counted",
                  lambda: udp_count("node-classifier") == c0 + tr.sent, timeout=20)
        # A new program, loaded by the agent with only BPF, PERFMON, NET_ADMIN, SYS_ADMIN, SYS_RESOURCE.
        kubectl("apply", "-f", "-", stdin=program("node-classifier-caps", "bpn2"))
        s = self.wait("node-classifier-caps Loaded (capabilities mode)", lambda: loaded("node-classifier-caps"),
                      timeout=90)
        self.assertIn(xdp_prog("bpn2"), s["programIds"])
        procs = agent_processes()
        self.check(procs and all("kubepods" in cg for _, cg in procs), f"the agent runs in a Pod: {procs}")
        if "SYS_RESOURCE" not in AGENT_CAPS:
            print("\n  note: this host's bounding set lacks CAP_SYS_RESOURCE; agent.capabilities without it",
                  flush=True)
        want = sum(1 << CAP_BITS[c] for c in AGENT_CAPS)
        for pid, _ in procs:
            with open(f"/proc/{pid}/status") as f:
                eff = int(next(line for line in f if line.startswith("CapEff:")).split()[1], 16)
            self.assertEqual(eff, want, f"agent pid {pid} holds exactly {AGENT_CAPS} (CapEff {eff:x})")
        c1 = udp_count("node-classifier-caps") or 0
        send("bpn3", 150)
        self.wait("150 frames counted by node-classifier-caps",
                  lambda: udp_count("node-classifier-caps") == c1 + 150, timeout=20)

    # 6. Prometheus discovers the Pods through the API server and scrapes them with the
    #    chart's PodMonitor relabelling: agents named by their node, operators by their Pod.
    def test_60_prometheus_scrapes_the_pods(self):
        # The upgrade's old Pods have gone (terminating ones would be discovered too).
        self.wait("only the 3 current Pods in the namespace",
                  lambda: (lambda items: len(items) == 3 and all(pod_ready(p) and not p["metadata"].get(
                      "deletionTimestamp") for p in items))(kjson("get", "pods", "-n", NS)["items"]), timeout=90)
        os.makedirs(PROM_DIR, exist_ok=True)
        sd_file = os.path.join(PROM_DIR, "pods.json")
        discovered_pods(sd_file)
        cfg = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
               "scrape_configs": [podmonitor_scrape_config(sd_file)]}
        with open(os.path.join(PROM_DIR, "prometheus.yml"), "w") as f:
            yaml.safe_dump(cfg, f, sort_keys=False)
        sh("promtool", "check", "config", os.path.join(PROM_DIR, "prometheus.yml"))
        sh("rm", "-rf", os.path.join(PROM_DIR, "data"))
        with open(os.path.join(PROM_DIR, "prometheus.log"), "w") as logf:
            prom = subprocess.Popen(["prometheus", f"--config.file={PROM_DIR}/prometheus.yml",
                                     f"--web.listen-address=127.0.0.1:{PROM_PORT}",
                                     f"--storage.tsdb.path={PROM_DIR}/data"],
                                    stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            def up():
                r = prom_query("up == 1")
                return len(r) == 3 and r
            try:
                targets = wait("3 targets up (2 operator Pods, 1 agent Pod)", up, timeout=60)
            except AssertionError as e:
                with open(os.path.join(PROM_DIR, "prometheus.log")) as f:
                    self.fail(f"{e}\n--- prometheus.log\n{f.read()[-3000:]}")
            by_job = {}
            for t in targets:
                by_job.setdefault(t["metric"]["job"], []).append(t["metric"])
            ops = {p["metadata"]["name"] for p in pods("operator")}
            self.assertEqual({m["pod"] for m in by_job["operator"]}, ops, "operators are named by their Pod")
            [agent] = by_job["agent"]
            self.assertEqual((agent["instance"], agent["node"], agent["component"]), (NODE, NODE, "agent"))
            self.assertNotIn("pod", agent, "an agent's series carry no pod label")
            # The agent's program metrics arrive through it, named by the node.
            info = wait("bpfpoly_program_info of the node's programs in Prometheus",
                        lambda: prom_query('bpfpoly_program_info{job="agent"}'), timeout=30)
            self.assertEqual({m["metric"]["program"] for m in info}, {"node-classifier", "node-classifier-caps"})
            self.assertTrue(all(m["metric"]["instance"] == NODE for m in info))
            self.assertTrue(wait("the leader's reconcile metrics",
                                 lambda: prom_query('bpfpoly_reconcile_duration_seconds_count{job="operator"}'),
                                 timeout=30))
        finally:
            prom.terminate()
            try:
                prom.wait(timeout=20)
            except subprocess.TimeoutExpired:
                prom.kill()
                prom.wait()

    # 9. helm uninstall: nothing left in the kernel, on bpffs or on a finalizer; CRDs stay.
    def test_90_uninstall_leaves_nothing(self):
        ids = set()
        for name in ("node-classifier", "node-classifier-caps"):
            s = node_program(name)
            if s:
                ids |= set(s.get("programIds") or [])
        self.assertTrue(ids, "programs were loaded before the uninstall")
        t0 = time.time()
        try:
            helm_cfg().uninstall(RELEASE, timeout=180)
        except helm.HelmError as e:
            self.fail(f"helm uninstall (its pre-delete hook unloads the programs): {e}")
        type(self).installed = False
        print(f"\n  helm uninstall: {time.time() - t0:.1f} s", flush=True)
        self.wait("the release's Pods gone", lambda: not pods(), timeout=120)
        self.assertEqual(kjson("get", "bpp")["items"], [], "no BpfPolyProgram left")
        self.assertTrue(ids.isdisjoint(bpftool_ids("prog")), "programs unloaded from the kernel")
        self.assertTrue(ids.isdisjoint(bpftool_ids("link")), "links gone")
        self.assertIsNone(xdp_prog("bpn0"), "nothing attached to bpn0")
        self.assertIsNone(xdp_prog("bpn2"), "nothing attached to bpn2")
        left = [os.path.join(r, f) for r, _, fs in os.walk(BPFFS) for f in fs] if os.path.isdir(BPFFS) else []
        self.assertEqual(left, [], f"no pins under {BPFFS}")
        stuck = []
        for kind in ("bpp", "bns", "bnp"):
            for o in kjson("get", kind)["items"]:
                if o["metadata"].get("finalizers"):
                    stuck.append(f"{kind}/{o['metadata']['name']} {o['metadata']['finalizers']}")
        self.assertEqual(stuck, [], "nothing stuck on a finalizer")
        crds = kjson("get", "crd")["items"]
        self.assertEqual(len([c for c in crds if c["spec"]["group"] == "bpfpoly.io"]), 3, "the CRDs stay")


    # 10. The README's "Install with Helm" on this machine, run as written (chart defaults:
    #     bpfpoly/bpfpoly:0.1.0 built offline and imported, the Helm SDK's install).
    def test_95_readme_install_with_helm_works_as_written(self):
        import re
        with open(os.path.join(REPO, "README.md")) as f:
            m = re.search(r"<!-- recipe: helm-install -->\s*```sh\n(.*?)```", f.read(), re.S)
        self.assertIsNotNone(m, "README.md has no `<!-- recipe: helm-install -->` shell block")
        type(self).installed = True
        t0 = time.time()
        out = subprocess.run(["bash", "-euo", "pipefail", "-c", m.group(1)], cwd=REPO, capture_output=True,
                             text=True, timeout=600, env={**os.environ, "KUBECONFIG": ""})
        took = time.time() - t0
        try:
            self.assertEqual(out.returncode, 0, f"the README recipe failed:\n{out.stdout[-3000:]}{out.stderr[-3000:]}")
            print(f"\n  README Install with Helm: {took:.1f} s", flush=True)
            ops, agents = pods("operator"), pods("agent")
            self.assertEqual((len(ops), len(agents)), (2, 1), out.stdout)
            for p in ops + agents:
                self.assertTrue(pod_ready(p), p["metadata"]["name"])
                self.assertEqual(p["spec"]["nodeName"], NODE)
                self.assertEqual(p["spec"]["containers"][0]["image"], "bpfpoly/bpfpoly:0.1.0")
            self.assertIn(lease_holder(), [p["metadata"]["name"] for p in ops])
        finally:
            helm_cfg().uninstall(RELEASE, timeout=180, ignore_not_found=True)
            type(self).installed = False
            self.wait("the recipe's Pods gone", lambda: not pods(), timeout=120)


if __name__ == "__main__":
    unittest.main(verbosity=2, failfast=True)
