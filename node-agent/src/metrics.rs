//! Agent metrics, with the names of the design. Event-like metrics (fallbacks, rejections,
//! load latency) are recorded as they happen; kernel-side values (dispatch counters, run
//! time) are read at scrape time from a [`Snapshot`] the agent takes of the loader.

use prometheus::{
    Histogram, HistogramOpts, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Kernel-side values of one running program, read at scrape time.
#[derive(Clone, Debug, Default)]
pub struct ProgramSnapshot {
    /// BpfPolyProgram name.
    pub program: String,
    /// Running variant.
    pub variant: String,
    /// Dispatch mechanism, or `none`.
    pub mechanism: String,
    /// Dispatch counts per key (summed over CPUs) and on the default path.
    pub dispatch: Option<(Vec<(u32, u64)>, u64)>,
    /// Per kernel program (C function name): run time in ns and run count.
    pub runs: Vec<(String, u64, u64)>,
    /// Keys whose handler slot is empty.
    pub empty_slots: Vec<u32>,
    /// Config fields that fell back on this node.
    pub config_fallbacks: Vec<String>,
}

/// Label values in use per counter (the program is the first label).
#[derive(Default)]
struct Series {
    fallbacks: std::collections::BTreeSet<Vec<String>>,
    rejections: std::collections::BTreeSet<Vec<String>>,
}

/// The agent's metrics.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Label values of the counters in use, by program, so that a program removed from the
    /// node takes its series with it.
    series: std::sync::Arc<std::sync::Mutex<Series>>,
    /// `bpfpoly_variant_fallbacks_total{program,from,to,stage}`.
    pub fallbacks: IntCounterVec,
    /// `bpfpoly_verifier_rejections_total{program,variant}`.
    pub verifier_rejections: IntCounterVec,
    /// `bpfpoly_load_duration_seconds`.
    pub load_duration: Histogram,
}

impl Metrics {
    /// Creates and registers the event-like metrics.
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let fallbacks = IntCounterVec::new(
            Opts::new(
                "bpfpoly_variant_fallbacks_total",
                "Fallbacks from one variant (or handler, or mechanism) to the next",
            ),
            &["program", "from", "to", "stage"],
        )?;
        let verifier_rejections = IntCounterVec::new(
            Opts::new(
                "bpfpoly_verifier_rejections_total",
                "Programs of a variant the verifier rejected",
            ),
            &["program", "variant"],
        )?;
        let load_duration = Histogram::with_opts(
            HistogramOpts::new(
                "bpfpoly_load_duration_seconds",
                "Time from assignment to attached (or failed)",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
        )?;
        registry.register(Box::new(fallbacks.clone()))?;
        registry.register(Box::new(verifier_rejections.clone()))?;
        registry.register(Box::new(load_duration.clone()))?;
        Ok(Metrics {
            registry,
            series: Default::default(),
            fallbacks,
            verifier_rejections,
            load_duration,
        })
    }

    fn series(&self) -> std::sync::MutexGuard<'_, Series> {
        self.series
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts one fallback of `program`.
    pub fn count_fallback(&self, program: &str, from: &str, to: &str, stage: &str) {
        let labels = [program, from, to, stage];
        self.fallbacks.with_label_values(&labels).inc();
        self.series()
            .fallbacks
            .insert(labels.map(String::from).to_vec());
    }

    /// Counts one verifier rejection of `variant` of `program`.
    pub fn count_rejection(&self, program: &str, variant: &str) {
        let labels = [program, variant];
        self.verifier_rejections.with_label_values(&labels).inc();
        self.series()
            .rejections
            .insert(labels.map(String::from).to_vec());
    }

    /// Drops every counter series of `program` (removed from this node).
    pub fn forget(&self, program: &str) {
        let mut series = self.series();
        series.fallbacks.retain(|l| {
            let keep = l[0] != program;
            if !keep {
                let _ = self.fallbacks.remove_label_values(l);
            }
            keep
        });
        series.rejections.retain(|l| {
            let keep = l[0] != program;
            if !keep {
                let _ = self.verifier_rejections.remove_label_values(l);
            }
            keep
        });
    }

    /// Renders everything, with the kernel-side values of `snapshot`.
    pub fn render(&self, snapshot: &[ProgramSnapshot]) -> Result<String, prometheus::Error> {
        let mut families = self.registry.gather();
        families.extend(scrape_families(snapshot)?);
        let mut out = String::new();
        TextEncoder::new().encode_utf8(&families, &mut out)?;
        Ok(out)
    }
}

/// Builds the scrape-time families in a throwaway registry.
fn scrape_families(
    snapshot: &[ProgramSnapshot],
) -> Result<Vec<prometheus::proto::MetricFamily>, prometheus::Error> {
    let r = Registry::new();
    let info = IntGaugeVec::new(
        Opts::new(
            "bpfpoly_program_info",
            "The variant and dispatch mechanism running, per program",
        ),
        &["program", "variant", "mechanism"],
    )?;
    let dispatch = IntCounterVec::new(
        Opts::new(
            "bpfpoly_dispatch_total",
            "Events dispatched to each key's handler (per-CPU map, summed)",
        ),
        &["program", "key"],
    )?;
    let default_path = IntCounterVec::new(
        Opts::new(
            "bpfpoly_dispatch_default_total",
            "Events that took the entry program's default path",
        ),
        &["program"],
    )?;
    let handler_degraded = IntGaugeVec::new(
        Opts::new(
            "bpfpoly_handler_degraded",
            "1 when a key's handler slot is empty on this node",
        ),
        &["program", "key"],
    )?;
    let config_fallbacks = IntGaugeVec::new(
        Opts::new(
            "bpfpoly_config_fallbacks",
            "1 when a config field runs with its fallback value",
        ),
        &["program", "field"],
    )?;
    let run_seconds = prometheus::CounterVec::new(
        Opts::new(
            "bpfpoly_prog_run_seconds_total",
            "Kernel run time of each program (BPF_ENABLE_STATS)",
        ),
        &["program", "prog"],
    )?;
    let runs = IntCounterVec::new(
        Opts::new(
            "bpfpoly_prog_runs_total",
            "Kernel run count of each program (BPF_ENABLE_STATS)",
        ),
        &["program", "prog"],
    )?;
    for p in snapshot {
        info.with_label_values(&[&p.program, &p.variant, &p.mechanism])
            .set(1);
        if let Some((keys, default)) = &p.dispatch {
            for (key, n) in keys {
                dispatch
                    .with_label_values(&[&p.program, &key.to_string()])
                    .inc_by(*n);
            }
            default_path
                .with_label_values(&[&p.program])
                .inc_by(*default);
        }
        for key in &p.empty_slots {
            handler_degraded
                .with_label_values(&[&p.program, &key.to_string()])
                .set(1);
        }
        for field in &p.config_fallbacks {
            config_fallbacks
                .with_label_values(&[&p.program, field])
                .set(1);
        }
        for (prog, ns, count) in &p.runs {
            run_seconds
                .with_label_values(&[&p.program, prog])
                .inc_by(*ns as f64 / 1e9);
            runs.with_label_values(&[&p.program, prog]).inc_by(*count);
        }
    }
    r.register(Box::new(info))?;
    r.register(Box::new(dispatch))?;
    r.register(Box::new(default_path))?;
    r.register(Box::new(handler_degraded))?;
    r.register(Box::new(config_fallbacks))?;
    r.register(Box::new(run_seconds))?;
    r.register(Box::new(runs))?;
    Ok(r.gather())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_removed_program_takes_its_counter_series_with_it() {
        let m = Metrics::new().unwrap();
        m.count_fallback("gone", "xdp", "tc", "verify");
        m.count_rejection("gone", "xdp");
        m.count_fallback("kept", "xdp", "tc", "attach");
        let before = m.render(&[]).unwrap();
        assert!(before.contains("program=\"gone\""), "{before}");
        m.forget("gone");
        let after = m.render(&[]).unwrap();
        assert!(!after.contains("program=\"gone\""), "{after}");
        assert!(
            after.contains(
                "bpfpoly_variant_fallbacks_total{from=\"xdp\",program=\"kept\",stage=\"attach\",to=\"tc\"} 1"
            ),
            "{after}"
        );
    }

    #[test]
    fn renders_design_names_with_bounded_labels() {
        let m = Metrics::new().unwrap();
        m.fallbacks
            .with_label_values(&["exec-tracer", "kprobe", "tp-btf", "attach"])
            .inc();
        m.load_duration.observe(0.02);
        let text = m
            .render(&[ProgramSnapshot {
                program: "packet-classifier".into(),
                variant: "xdp-tailcall".into(),
                mechanism: "tailCall".into(),
                dispatch: Some((vec![(6, 10), (17, 3)], 4)),
                runs: vec![("classify".into(), 2_000_000_000, 17)],
                empty_slots: vec![17],
                config_fallbacks: vec!["count_bytes".into()],
            }])
            .unwrap();
        for line in [
            "bpfpoly_variant_fallbacks_total{from=\"kprobe\",program=\"exec-tracer\",stage=\"attach\",to=\"tp-btf\"} 1",
            "bpfpoly_program_info{mechanism=\"tailCall\",program=\"packet-classifier\",variant=\"xdp-tailcall\"} 1",
            "bpfpoly_dispatch_total{key=\"6\",program=\"packet-classifier\"} 10",
            "bpfpoly_dispatch_default_total{program=\"packet-classifier\"} 4",
            "bpfpoly_handler_degraded{key=\"17\",program=\"packet-classifier\"} 1",
            "bpfpoly_config_fallbacks{field=\"count_bytes\",program=\"packet-classifier\"} 1",
            "bpfpoly_prog_run_seconds_total{prog=\"classify\",program=\"packet-classifier\"} 2",
            "bpfpoly_prog_runs_total{prog=\"classify\",program=\"packet-classifier\"} 17",
            "bpfpoly_load_duration_seconds_count 1",
        ] {
            assert!(text.contains(line), "missing {line} in:\n{text}");
        }
    }
}
