//! The words of a status: what runs where, each degradation, and the config values
//! that fell back, as `ProgramStatus.message` says them.

use std::time::{SystemTime, UNIX_EPOCH};

use bpfpoly_crds::state::{FallbackRecord, HandlerState, ResolvedConfig};

use super::{LinkRecord, RunningInfo, MAX_FALLBACKS};

pub(super) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub(super) fn bound(mut fallbacks: Vec<FallbackRecord>) -> Vec<FallbackRecord> {
    fallbacks.truncate(MAX_FALLBACKS);
    fallbacks
}

pub(super) fn describe_links(links: &[LinkRecord]) -> String {
    let parts: Vec<String> = links
        .iter()
        .filter(|l| l.kind != "freplace")
        .map(|l| match (&l.mode, l.netlink) {
            (Some(m), Some(_)) => format!("{} (netlink) {} ({m})", l.kind, l.target),
            (Some(m), None) => format!("{} {} ({m})", l.kind, l.target),
            (None, _) => format!("{} {}", l.kind, l.target),
        })
        .collect();
    if parts.is_empty() {
        "no attachment".to_owned()
    } else {
        parts.join(", ")
    }
}

pub(super) fn describe_fallback(f: &FallbackRecord) -> String {
    format!("{} -> {} ({}: {})", f.from, f.to, f.stage, f.reason)
}

pub(super) fn running_message(
    info: &RunningInfo,
    handlers: &[HandlerState],
    fallbacks: &[FallbackRecord],
    config: &[ResolvedConfig],
) -> String {
    let mut message = format!("variant {} running", info.variant);
    if let Some(m) = &info.mechanism {
        let loaded = handlers.iter().filter(|h| h.state == "Loaded").count();
        message.push_str(&format!(
            " ({m} dispatch, {loaded}/{} handlers)",
            handlers.len()
        ));
    }
    message.push_str(&format!(" on {}", describe_links(&info.links)));
    if !fallbacks.is_empty() {
        let steps: Vec<String> = fallbacks.iter().map(describe_fallback).collect();
        message.push_str(&format!("; degraded: {}", steps.join("; ")));
    }
    let fell_back: Vec<String> = config
        .iter()
        .filter(|c| c.fell_back)
        .map(|c| match &c.reason {
            Some(r) => format!("{}={} ({r})", c.name, c.value),
            None => format!("{}={}", c.name, c.value),
        })
        .collect();
    if !fell_back.is_empty() {
        message.push_str(&format!("; config fallbacks: {}", fell_back.join(", ")));
    }
    message
}
