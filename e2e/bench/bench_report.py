#!/usr/bin/env python3
"""Assembles `make bench` results (e2e/bench/bench.sh).

    bench_report.py select OUT_DIR      criterion estimates -> OUT_DIR/select.json
    bench_report.py operator OUT_DIR    OUT_DIR/operator-*.json -> OUT_DIR/operator.json
    bench_report.py report OUT_DIR      every section -> OUT_DIR/results.json (a list of
                                        {name, value, unit, anchor, anchor_value, ratio,
                                        target, met}), OUT_DIR/results.md, and a table on
                                        stdout

Only the standard library.
"""

import json
import os
import sys

SECTIONS = ["dispatch", "agent", "operator", "select"]


def row(name, value, unit, anchor=None, anchor_value=None, ratio=None, target=None,
        met=None, **extra):
    r = {"name": name, "value": value, "unit": unit, "anchor": anchor,
         "anchor_value": anchor_value, "ratio": ratio, "target": target, "met": met}
    r.update(extra)
    return r


def rnd(x, digits=2):
    return None if x is None else round(x, digits)


# --- selection engine (criterion) ---------------------------------------------------------

def select(out):
    # cargo puts criterion's output next to target/bench: <target>/criterion/select.
    root = os.environ.get("BENCH_CRITERION_DIR") or os.path.join(
        os.path.dirname(os.path.abspath(out)), "criterion", "select")

    def mean_ns(bench):
        with open(os.path.join(root, bench, "new", "estimates.json")) as f:
            e = json.load(f)
        return e["mean"]["point_estimate"], e["median"]["point_estimate"]

    rows = []
    for sample in ["exec-tracer", "packet-classifier"]:
        d_mean, d_median = mean_ns(f"decide_{sample}")
        s_mean, s_median = mean_ns(f"serde_json_spec_{sample}")
        dps, sps = 1e9 / d_mean, 1e9 / s_mean
        rows.append(row(
            f"select: decide({sample}) vs a full NodeFacts", rnd(dps, 0), "decisions/s",
            f"serde_json deserializing the same spec (deserializations/s; {s_mean / 1e3:.2f} us each)",
            rnd(sps, 0), rnd(dps / sps, 3), None, None,
            ns_per_decision=rnd(d_mean, 1), ns_per_decision_median=rnd(d_median, 1)))
    doc = {"section": "select", "rows": rows,
           "note": "criterion (default-features off), mean of 40 samples over 2 s; "
                   "ratio = decisions/s / deserializations/s (>1: deciding is cheaper "
                   "than parsing the spec it decides)"}
    with open(os.path.join(out, "select.json"), "w") as f:
        json.dump(doc, f, indent=1)


# --- operator at scale ----------------------------------------------------------------------

def apiserver_summary(path):
    """Requests and mean latency per verb and resource (bpfpoly.io) from /metrics."""
    import re
    if not os.path.exists(path):
        return None
    acc = {}
    with open(path) as f:
        for line in f:
            if not line.startswith(("apiserver_request_duration_seconds_sum{",
                                    "apiserver_request_duration_seconds_count{")):
                continue
            m = re.match(r"(\w+)\{(.*)\} (\S+)", line)
            if not m or 'group="bpfpoly.io"' not in m.group(2):
                continue
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
            key = f"{labels.get('verb')} {labels.get('resource')}" + (
                f"/{labels['subresource']}" if labels.get("subresource") else "")
            slot = acc.setdefault(key, [0.0, 0.0])
            slot[0 if m.group(1).endswith("_count") else 1] += float(m.group(3))
    return {k: {"requests": int(c), "mean_latency_s": round(t / c, 3)}
            for k, (c, t) in sorted(acc.items()) if c}


def operator(out):
    runs = []
    for name in sorted(os.listdir(out)):
        if name.startswith("operator-") and name.endswith(".json"):
            with open(os.path.join(out, name)) as f:
                runs.append(json.load(f))
    runs.sort(key=lambda r: r["nodes"])
    for r in runs:
        r["apiserver"] = apiserver_summary(os.path.join(out, f"apiserver-metrics-{r['nodes']}.txt"))
    base = next((r for r in runs if r["nodes"] == 500 and r.get("converged")), None)
    rows = []
    for r in runs:
        n, progs = r["nodes"], r["programs"]
        label = f"operator: {n} simulated nodes x {progs} programs, 3 kernel builds"
        conv = r.get("converge_seconds") if r.get("converged") else None
        is_target = n == 5000
        if conv is None:
            rows.append(row(f"{label}: time to converge", None, "s",
                            "500-node run, scaled to N (linear)",
                            rnd(base["converge_seconds"] * n / 500) if base else None,
                            None, "<= 60 s" if is_target else None,
                            False if is_target else None,
                            note=r.get("note", "not converged")))
        else:
            av = base["converge_seconds"] * n / 500 if base else None
            rows.append(row(f"{label}: time to converge", rnd(conv), "s",
                            "500-node run, scaled to N (linear)", rnd(av),
                            rnd(conv / av, 3) if av else None,
                            "<= 60 s" if is_target else None,
                            (conv <= 60) if is_target else None))
        rss = r.get("peak_rss_mib")
        so_far = rss is None and r.get("peak_rss_mib_so_far") is not None
        if so_far:
            rss = r["peak_rss_mib_so_far"]
        if is_target and rss is not None:
            met = False if rss > 200 else (None if so_far else True)
        else:
            met = None
        rows.append(row(f"{label}: operator peak RSS" + (" (so far, at the stop)" if so_far else ""),
                        rnd(rss, 1), "MiB",
                        "500-node run's peak RSS", rnd(base["peak_rss_mib"], 1) if base else None,
                        rnd(rss / base["peak_rss_mib"], 3) if base and rss else None,
                        "<= 200 MiB" if is_target else None, met))
        req = r.get("api_requests")
        if req is not None:
            av = base["api_requests"] * n / 500 if base else None
            rows.append(row(f"{label}: API requests (apiserver_request_total delta)", req,
                            "requests", "500-node run, scaled to N (linear)", rnd(av, 0),
                            rnd(req / av, 3) if av else None, None, None))
    # Growth exponent between consecutive converged sizes: T ~ N^k.
    import math
    conv = [(r["nodes"], r["converge_seconds"]) for r in runs if r.get("converged")]
    growth = []
    for (n0, t0), (n1, t1) in zip(conv, conv[1:]):
        growth.append({"from": n0, "to": n1, "exponent": rnd(math.log(t1 / t0) / math.log(n1 / n0), 2)})
    doc = {"section": "operator", "rows": rows, "runs": runs, "growth": growth,
           "note": "real kube-apiserver 1.20 (private to the benchmark), SIMULATED nodes "
                   "(Node objects and BpfNodeProfile statuses written by "
                   "operator/examples/scale.rs; no agents, no kernels)"}
    with open(os.path.join(out, "operator.json"), "w") as f:
        json.dump(doc, f, indent=1)


# --- the report -----------------------------------------------------------------------------

def fmt(x):
    if x is None:
        return "-"
    if isinstance(x, float):
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        return f"{x:g}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def report(out):
    rows = []
    missing = []
    for s in SECTIONS:
        p = os.path.join(out, f"{s}.json")
        if not os.path.exists(p):
            missing.append(s)
            continue
        with open(p) as f:
            doc = json.load(f)
        for r in doc["rows"]:
            r = dict(r)
            r.setdefault("met", None)
            rows.append(r)
    keys = ["name", "value", "unit", "anchor", "anchor_value", "ratio", "target", "met"]
    results = [{k: r.get(k) for k in keys} | ({"note": r["note"]} if r.get("note") else {})
               for r in rows]
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)

    md = ["| benchmark | value | anchor (same run) | ratio | target | met |",
          "|---|---:|---|---:|---|---|"]
    for r in results:
        value = "n/a" if r["value"] is None else f"{fmt(r['value'])} {r['unit']}"
        if r.get("note") and r["value"] is None:
            value = r["note"]
        anchor = "-" if r["anchor"] is None else f"{r['anchor']}: {fmt(r['anchor_value'])}"
        met = {True: "met", False: "**missed**", None: ""}[r["met"]]
        md.append(f"| {r['name']} | {value} | {anchor} | {fmt(r['ratio'])} | "
                  f"{r['target'] or ''} | {met} |")
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(md) + "\n")

    w = max(len(r["name"]) for r in results) if results else 10
    w = min(w, 100)
    print(f"{'benchmark':{w}}  {'value':>18}  {'anchor':>12}  {'ratio':>7}  target")
    for r in results:
        value = "n/a" if r["value"] is None else f"{fmt(r['value'])} {r['unit']}"
        met = {True: "met", False: "MISSED", None: ""}[r["met"]]
        target = f"{r['target'] or ''} {met}".strip()
        print(f"{r['name'][:w]:{w}}  {value:>18}  {fmt(r['anchor_value']):>12}  "
              f"{fmt(r['ratio']):>7}  {target}")
        if r.get("note") and r["value"] is None:
            print(f"{'':{w}}    ({r['note']})")
    if missing:
        print(f"\nsections without results: {', '.join(missing)}")
    print(f"\n{len(results)} results -> {os.path.join(out, 'results.json')}")
    return 0


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in ("select", "operator", "report"):
        print(__doc__, file=sys.stderr)
        return 2
    cmd, out = sys.argv[1], sys.argv[2]
    {"select": select, "operator": operator, "report": report}[cmd](out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
