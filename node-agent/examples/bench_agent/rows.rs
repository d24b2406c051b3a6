//! The agent's samples and the result rows made from them.

use serde_json::{json, Value};

/// Every sample, in milliseconds.
pub struct Samples {
    pub bt_load: Vec<f64>,
    pub bt_load_attach: Vec<f64>,
    pub bt_fallback: Vec<f64>,
    pub upd_paced: Vec<f64>,
    pub upd_paced_reported: Vec<f64>,
    pub upd_tight: Vec<f64>,
    pub fresh: Vec<f64>,
    pub fb_whole: Vec<f64>,
    pub fb_after: Vec<f64>,
    pub prof_wall: Vec<f64>,
    pub prof_btf: Vec<f64>,
    pub prof_total: Vec<f64>,
    pub bt_probe: Vec<f64>,
    pub bt_dump: Vec<f64>,
}

impl Samples {
    pub fn to_json(&self) -> Value {
        json!({
            "update_paced_wall": rounded(&self.upd_paced),
            "update_paced_reported": rounded(&self.upd_paced_reported),
            "update_back_to_back_wall": rounded(&self.upd_tight),
            "fresh_load": rounded(&self.fresh),
            "fallback_whole": rounded(&self.fb_whole),
            "fallback_after_rejection": rounded(&self.fb_after),
            "bpftool_loadall": rounded(&self.bt_load),
            "bpftool_loadall_attach": rounded(&self.bt_load_attach),
            "bpftool_fallback": rounded(&self.bt_fallback),
            "profile_process": rounded(&self.prof_wall),
            "profile_btf_internal": rounded(&self.prof_btf),
            "profile_total_internal": rounded(&self.prof_total),
            "bpftool_feature_probe": rounded(&self.bt_probe),
            "bpftool_btf_dump": rounded(&self.bt_dump),
        })
    }
}

/// Nearest-rank percentile.
pub fn pct(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * s.len() as f64).ceil().max(1.0) as usize;
    s[rank.min(s.len()) - 1]
}

fn p50(v: &[f64]) -> f64 {
    pct(v, 50.0)
}

fn p99(v: &[f64]) -> f64 {
    pct(v, 99.0)
}

fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

pub fn rounded(v: &[f64]) -> Vec<f64> {
    v.iter().map(|x| round(*x)).collect()
}

/// One result row (ms): `met` when value <= `max_value` or ratio <= `max_ratio`, where given.
struct Row {
    name: &'static str,
    value: f64,
    anchor: Option<(&'static str, f64)>,
    target: Option<&'static str>,
    max_value: Option<f64>,
    max_ratio: Option<f64>,
}

fn ms_row(name: &'static str, value: f64) -> Row {
    Row {
        name,
        value,
        anchor: None,
        target: None,
        max_value: None,
        max_ratio: None,
    }
}

impl Row {
    fn vs(mut self, anchor: (&'static str, f64)) -> Self {
        self.anchor = Some(anchor);
        self
    }

    fn at_most(mut self, target: &'static str, max_value: f64) -> Self {
        (self.target, self.max_value) = (Some(target), Some(max_value));
        self
    }

    fn ratio_at_most(mut self, target: &'static str, max_ratio: f64) -> Self {
        (self.target, self.max_ratio) = (Some(target), Some(max_ratio));
        self
    }

    fn json(self) -> Value {
        let ratio = self
            .anchor
            .map(|(_, a)| (self.value / a * 1000.0).round() / 1000.0);
        let met = match (self.max_value, self.max_ratio, ratio) {
            (Some(m), _, _) => Some(self.value <= m),
            (None, Some(m), Some(r)) => Some(r <= m),
            _ => None,
        };
        json!({
            "name": self.name, "value": round(self.value), "unit": "ms",
            "anchor": self.anchor.map(|(n, _)| n), "anchor_value": self.anchor.map(|(_, a)| round(a)),
            "ratio": ratio, "target": self.target, "met": met,
        })
    }
}

pub fn agent_rows(s: &Samples) -> Vec<Value> {
    let bt_la = (
        "bpftool prog loadall + net attach (p50)",
        p50(&s.bt_load_attach),
    );
    let bt_fb = (
        "bpftool loadall rejected + loadall good + attach (p50)",
        p50(&s.bt_fallback),
    );
    let probe = ("bpftool feature probe (p50)", p50(&s.bt_probe));
    let dump = ("bpftool btf dump file vmlinux (p50)", p50(&s.bt_dump));
    let rows = [
        ms_row(
            "agent: assignment -> attached, update p50 (paced)",
            p50(&s.upd_paced),
        )
        .vs(bt_la)
        .at_most("<= 50 ms", 50.0),
        ms_row(
            "agent: assignment -> attached, update p99 (paced)",
            p99(&s.upd_paced),
        )
        .vs(bt_la),
        ms_row(
            "agent: assignment -> attached, update p50 (back to back)",
            p50(&s.upd_tight),
        )
        .vs(bt_la)
        .at_most("<= 50 ms", 50.0),
        ms_row(
            "agent: assignment -> attached, update p99 (back to back)",
            p99(&s.upd_tight),
        )
        .vs(bt_la),
        ms_row(
            "agent: verifier reject -> fallback attached, whole apply p50",
            p50(&s.fb_whole),
        )
        .vs(bt_fb)
        .at_most("<= 100 ms", 100.0),
        ms_row(
            "agent: verifier reject -> fallback attached, whole apply p99",
            p99(&s.fb_whole),
        )
        .vs(bt_fb),
        ms_row(
            "agent: verifier reject -> fallback attached, after the rejection p50",
            p50(&s.fb_after),
        )
        .vs((
            "bpftool loadall good + attach (p50)",
            p50(&s.bt_load_attach),
        ))
        .at_most("<= 100 ms", 100.0),
        ms_row(
            "agent: load same object, fresh apply (load+attach+pin) p50",
            p50(&s.fresh),
        )
        .vs(("bpftool prog loadall (p50)", p50(&s.bt_load))),
        ms_row(
            "agent: load same object, fresh apply vs bpftool load+attach p50",
            p50(&s.fresh),
        )
        .vs(bt_la)
        .ratio_at_most("ratio <= 1.00", 1.0),
        ms_row(
            "agent: start-up profile (BTF parse + probes), process p50",
            p50(&s.prof_wall),
        )
        .vs(probe)
        .ratio_at_most("ratio < 1.00 (faster)", 0.999),
        ms_row(
            "agent: start-up profile (BTF parse + probes), process min",
            pct(&s.prof_wall, 0.0),
        )
        .vs(("bpftool feature probe (min)", pct(&s.bt_probe, 0.0))),
        ms_row(
            "agent: start-up profile, BTF part (read+hash+parse+index) p50",
            p50(&s.prof_btf),
        )
        .vs(dump),
        ms_row(
            "agent: start-up profile, process p50 vs BTF dump",
            p50(&s.prof_wall),
        )
        .vs(dump),
    ];
    rows.into_iter().map(Row::json).collect()
}
