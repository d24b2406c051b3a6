"""The chart's release for `make run` through the Helm SDK (helm-python-sdk: Helm 4's Go SDK as
a library; no helm binary), for e2e/env/run.sh.

  python3 e2e/env/helm-release.py apply RELEASE NAMESPACE VALUES_JSON   install, or upgrade if installed
  python3 e2e/env/helm-release.py uninstall RELEASE NAMESPACE           uninstall (runs the pre-delete
                                                                    hook that unloads every program)
  python3 e2e/env/helm-release.py status RELEASE NAMESPACE              exit 0 when deployed, 3 if not

KUBECONFIG names the cluster. Errors are Helm's own, with the release named.
"""

import json
import os
import sys

import helm_python as helm

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHART = os.path.join(REPO, "charts", "bpfpoly")


def deployed(cfg, release):
    try:
        rel = cfg.status(release)
    except helm.HelmNotFoundError:
        return None
    except helm.HelmError as e:
        if "not found" in str(e):
            return None
        raise
    info = rel.get("info", rel)
    return info.get("status")


def main(argv):
    if len(argv) < 3 or argv[0] not in ("apply", "uninstall", "status"):
        print(__doc__, file=sys.stderr)
        return 2
    cmd, release, ns = argv[0], argv[1], argv[2]
    cfg = helm.Config(kubeconfig_path=os.environ["KUBECONFIG"], namespace=ns)
    try:
        if cmd == "status":
            status = deployed(cfg, release)
            print(status or "not installed")
            return 0 if status == "deployed" else 3
        if cmd == "uninstall":
            if deployed(cfg, release) is None:
                print(f"release {ns}/{release}: not installed")
                return 0
            cfg.uninstall(release, timeout=240)
            print(f"release {ns}/{release}: uninstalled")
            return 0
        values = json.loads(argv[3])
        status = deployed(cfg, release)
        if status is None:
            cfg.install(CHART, release, values, namespace=ns, create_namespace=True, timeout=180)
            print(f"release {ns}/{release}: installed")
        else:
            # A failed or pending earlier attempt is upgraded too (Helm refuses a second install).
            cfg.upgrade(CHART, release, values, namespace=ns, timeout=180, reset_values=True)
            print(f"release {ns}/{release}: upgraded (was {status})")
        return 0
    except helm.HelmError as e:
        print(f"helm {cmd} {ns}/{release}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
