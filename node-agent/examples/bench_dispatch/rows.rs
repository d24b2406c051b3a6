//! The result rows of one frame: each configuration as a statistic over its runs, next to
//! its anchor, with the spread of the runs and of the per-round ratios.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::stats::{median, min, percentile, round};

/// The estimated libxdp dispatcher with the handler in its slot: direct + (libxdp - empty).
pub const LIBXDP_EST: &str = "libxdp+handler (est.)";

/// One row of a frame and statistic: what, whose runs, against whose runs, the target.
struct Line {
    what: &'static str,
    subject: &'static str,
    anchor: Option<(&'static str, &'static str)>,
    target: Option<(f64, &'static str)>,
}

const EMPTY: Option<(&str, &str)> = Some(("empty XDP program", "empty"));
const DIRECT: Option<(&str, &str)> = Some(("direct handler", "direct"));
const LIBXDP: Option<(&str, &str)> = Some(("libxdp + handler (est.)", LIBXDP_EST));

const LINES: &[Line] = &[
    Line {
        what: "empty XDP program (test_run loop)",
        subject: "empty",
        anchor: None,
        target: None,
    },
    Line {
        what: "direct handler, no dispatch (floor)",
        subject: "direct",
        anchor: EMPTY,
        target: None,
    },
    Line {
        what: "static dispatch (fastest here)",
        subject: "static",
        anchor: DIRECT,
        target: Some((1.10, "ratio <= 1.10")),
    },
    Line {
        what: "tail-call dispatch",
        subject: "tailcall",
        anchor: DIRECT,
        target: Some((1.50, "ratio <= 1.50")),
    },
    Line {
        what: "libxdp dispatcher, 1 slot unfilled (raw)",
        subject: "libxdp",
        anchor: EMPTY,
        target: None,
    },
    Line {
        what: "libxdp dispatcher + handler (est. direct + dispatcher - empty)",
        subject: LIBXDP_EST,
        anchor: DIRECT,
        target: None,
    },
    Line {
        what: "static vs libxdp",
        subject: "static",
        anchor: LIBXDP,
        target: Some((1.0, "ratio <= 1.00")),
    },
    Line {
        what: "tail call vs libxdp",
        subject: "tailcall",
        anchor: LIBXDP,
        target: Some((1.0, "ratio <= 1.00")),
    },
];

type Stat = fn(&[f64]) -> f64;

/// A configuration's statistic; the libxdp estimate is direct + (libxdp - empty) of the
/// same statistic.
fn value(runs: &BTreeMap<&str, Vec<f64>>, key: &str, stat: Stat) -> Option<f64> {
    if key == LIBXDP_EST {
        return Some(
            value(runs, "direct", stat)? + value(runs, "libxdp", stat)?
                - value(runs, "empty", stat)?,
        );
    }
    runs.get(key).map(|v| stat(v))
}

/// The libxdp estimate of each round, from that round's runs (for the spread).
pub fn add_libxdp_estimate(runs: &mut BTreeMap<&str, Vec<f64>>) {
    let (Some(d), Some(l), Some(e)) = (runs.get("direct"), runs.get("libxdp"), runs.get("empty"))
    else {
        return;
    };
    let est = d
        .iter()
        .zip(l)
        .zip(e)
        .map(|((d, l), e)| d + l - e)
        .collect();
    runs.insert(LIBXDP_EST, est);
}

/// Spread of the runs and of the per-round ratios (each round's run over the same round's
/// anchor run, so noise that hits a whole round cancels).
fn spread(runs: &BTreeMap<&str, Vec<f64>>, line: &Line) -> Value {
    let Some(v) = runs.get(line.subject) else {
        return Value::Null;
    };
    let (p10, p90) = (percentile(v, 10.0), percentile(v, 90.0));
    let mut text = format!(
        "runs p10-p90 {:.2}-{:.2}, min-max {:.2}-{:.2}",
        p10,
        p90,
        min(v),
        v.iter().copied().fold(f64::NEG_INFINITY, f64::max)
    );
    let mut out = json!({"p10": round(p10, 2), "p90": round(p90, 2)});
    if let Some(a) = line.anchor.and_then(|(_, key)| runs.get(key)) {
        let r: Vec<f64> = v.iter().zip(a).map(|(x, y)| x / y).collect();
        let (m, lo, hi) = (median(&r), percentile(&r, 10.0), percentile(&r, 90.0));
        text.push_str(&format!(
            "; per-round ratio median {m:.3}, p10-p90 {lo:.3}-{hi:.3}"
        ));
        out["round_ratio_median"] = json!(round(m, 3));
        out["round_ratio_p10"] = json!(round(lo, 3));
        out["round_ratio_p90"] = json!(round(hi, 3));
    }
    out["text"] = json!(text);
    out
}

fn row(
    runs: &BTreeMap<&str, Vec<f64>>,
    prefix: &str,
    line: &Line,
    stat: Stat,
    with_spread: bool,
) -> Value {
    let v = value(runs, line.subject, stat);
    let a = line.anchor.and_then(|(_, key)| value(runs, key, stat));
    let ratio = match (v, a) {
        (Some(v), Some(a)) if a > 0.0 => Some(round(v / a, 3)),
        _ => None,
    };
    let met = ratio.zip(line.target).map(|(r, (t, _))| r <= t);
    let spread = if with_spread {
        spread(runs, line)
    } else {
        Value::Null
    };
    json!({
        "name": format!("{prefix}: {}", line.what), "value": v.map(|v| round(v, 2)),
        "unit": "ns/pkt", "anchor": line.anchor.map(|(name, _)| name),
        "anchor_value": a.map(|v| round(v, 2)), "ratio": ratio,
        "target": line.target.map(|(_, text)| text), "met": met,
        "spread": spread.get("text"), "spread_detail": spread,
    })
}

/// The rows of one frame: every line as the minimum, then as the median with its spread.
pub fn frame_rows(frame: &str, runs: &BTreeMap<&str, Vec<f64>>) -> Vec<Value> {
    let mut rows = Vec::new();
    for (stat_name, stat) in [("min", min as Stat), ("median", median)] {
        let prefix = format!("dispatch {frame} {stat_name}");
        for line in LINES {
            rows.push(row(runs, &prefix, line, stat, stat_name == "median"));
        }
    }
    rows
}
