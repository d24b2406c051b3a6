//! The dispatch counters of a running version: the per-CPU `bpfpoly_dispatch` map
//! pinned in its directory, read per key and for the default path, and carried over
//! an update so that they never go backwards while the agent runs.

use std::path::Path;

use aya::maps::{Map, MapData, PerCpuArray};

use super::{pins, DispatchCounts, Loader, Running, DEFAULT_SLOT};

impl Loader {
    /// Reads the dispatch counters of `name` (per dispatch key and the default
    /// path, summed over CPUs). None without counters or when the read fails.
    pub fn dispatch_counts(&self, name: &str) -> Option<DispatchCounts> {
        let running = self.running.get(name)?;
        let mut counts = own(running)?;
        counts.default = counts.default.wrapping_add(running.carried.default);
        for (key, n) in &mut counts.per_key {
            *n = n.wrapping_add(running.carried.per_key.get(key).copied().unwrap_or(0));
        }
        Some(counts)
    }
}

/// The counts in `running`'s own counter map (per key and the default path, summed over CPUs).
pub(super) fn own(running: &Running) -> Option<DispatchCounts> {
    let counters = running.counters.as_ref()?;
    let read = |key: u32| -> Option<u64> {
        let values = counters.get(&key, 0).ok()?;
        Some(values.iter().copied().fold(0u64, u64::wrapping_add))
    };
    let mut counts = DispatchCounts {
        default: read(DEFAULT_SLOT)?,
        ..DispatchCounts::default()
    };
    for &key in &running.info.dispatch_keys {
        counts.per_key.insert(key, read(key)?);
    }
    Some(counts)
}

/// Opens the counter map pinned in a version's directory, if it has one.
pub(super) fn open(dir: &Path) -> Option<PerCpuArray<MapData, u64>> {
    let path = dir.join(pins::DISPATCH_PIN);
    if !path.exists() {
        return None;
    }
    let map = MapData::from_pin(&path)
        .ok()
        .and_then(|d| Map::from_map_data(d).ok())?;
    PerCpuArray::try_from(map).ok()
}

/// What the new version starts from: what `old` carried plus its own last counts.
pub(super) fn carried_over(old: &Running) -> DispatchCounts {
    let mut carried = DispatchCounts::default();
    if let Some(last) = own(old) {
        carried.default = old.carried.default.wrapping_add(last.default);
        for (key, n) in last.per_key {
            let before = old.carried.per_key.get(&key).copied().unwrap_or(0);
            carried.per_key.insert(key, before.wrapping_add(n));
        }
    }
    carried
}
