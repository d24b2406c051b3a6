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

import signal
import sys
import time
import unittest
from typing import Any

import chart_apiserver_test
import chart_lint_test
import chart_render_test
from chart_support import APP_VERSION, CHART, KUBECONFIG, NS, OFFLINE, RELEASE, helm

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
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", action="append", default=[], help="only tests whose id contains this (repeatable)")
    args = ap.parse_args()
    SKIP_SERVER = chart_apiserver_test.SKIP_SERVER = chart_apiserver_test.cluster_reachable()
    if SKIP_SERVER and not OFFLINE:
        print(f"[chart-test] ERROR: {SKIP_SERVER} (KUBECONFIG={KUBECONFIG})", file=sys.stderr)
        return 2
    print(f"[chart-test] chart {CHART.name} {CHART.version} (app {APP_VERSION}), Helm SDK {helm.helm_sdk_version()}, "
          f"release {RELEASE} in {NS}" + ("" if not SKIP_SERVER else f"; API-server tests skipped: {SKIP_SERVER}"))
    loader = unittest.TestLoader()
    if args.k:
        loader.testNamePatterns = [f"*{k}*" for k in args.k]
    classes = [c for m in (chart_lint_test, chart_render_test, chart_apiserver_test)
               for c in vars(m).values()
               if isinstance(c, type) and issubclass(c, unittest.TestCase) and c.__module__ == m.__name__]
    # T1Lint, T2Render, T3Schema, T4Dashboard, T5ApiServer: the order of their names.
    suite = unittest.TestSuite(loader.loadTestsFromTestCase(c) for c in sorted(classes, key=lambda c: c.__name__))
    t0 = time.monotonic()
    # SIGTERM (a CI timeout) unwinds like Ctrl-C, so the cleanup below runs.
    def on_sigterm(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        result = unittest.TextTestRunner(stream=sys.stdout, verbosity=0, resultclass=TimedResult).run(suite)
    except KeyboardInterrupt:
        print("[chart-test] interrupted: cleaning up", file=sys.stderr)
        chart_apiserver_test.T5ApiServer.clean_up()
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
