//! Adoption: a restarted agent takes over what a previous one pinned, without
//! detaching anything, and repairs what an interrupted update left behind.

use std::{
    fs,
    path::{Path, PathBuf},
};

use tracing::warn;

use super::{attach, counters, pins, Adopted, Loader, Record, Running, RunningInfo};

impl Loader {
    /// Finds the programs a previous agent pinned under the root and takes them over
    /// without detaching anything. Interrupted attempts (directories without a
    /// record) are removed, and of several recorded versions of a program (an update
    /// interrupted after its record was written) the newest is kept.
    pub fn adopt(&mut self) -> Vec<Adopted> {
        let root = self.cfg.bpffs_root.clone();
        let Ok(entries) = fs::read_dir(&root) else {
            return Vec::new();
        };
        let mut adopted = Vec::new();
        for entry in entries.flatten() {
            let program_dir = entry.path();
            if !program_dir.is_dir() {
                continue;
            }
            if let Some(found) = self.adopt_program(&program_dir) {
                adopted.push(found);
            }
        }
        adopted
    }

    fn adopt_program(&mut self, program_dir: &Path) -> Option<Adopted> {
        let mut records: Vec<(Record, PathBuf)> = Vec::new();
        for sub in fs::read_dir(program_dir).ok()?.flatten() {
            let dir = sub.path();
            if !dir.is_dir() {
                continue;
            }
            let record = pins::read_meta(&dir).and_then(|json| {
                serde_json::from_slice::<Record>(&json).map_err(|e| format!("record: {e}"))
            });
            match record {
                Ok(r) if r.version == pins::META_VERSION => {
                    records.push((r, dir));
                    continue;
                }
                Ok(r) => warn!(
                    "{}: record version {} not understood; removing",
                    dir.display(),
                    r.version
                ),
                Err(e) => warn!("{}: interrupted attempt ({e}); removing", dir.display()),
            }
            if let Err(e) = pins::remove_dir(&dir) {
                warn!("removing {}: {e}", dir.display());
            }
        }
        records.sort_by_key(|(r, _)| r.created_unix_ms);
        let (record, dir) = records.pop()?;
        for (_, stale) in records {
            warn!(
                "{}: superseded by {}; removing",
                stale.display(),
                dir.display()
            );
            if let Err(e) = pins::remove_dir(&stale) {
                warn!("removing {}: {e}", stale.display());
            }
        }
        if self.running.contains_key(&record.program) {
            return None;
        }
        let mut info = record.info;
        info.pin_dir = dir.clone();
        let (consistent, note) = verify_links(&info);
        let counters = counters::open(&dir);
        let adopted = Adopted {
            name: record.program.clone(),
            digest: info.digest.clone(),
            status: record.status.clone(),
            info: info.clone(),
            consistent,
            note,
        };
        self.reported
            .insert(record.program.clone(), record.status.clone());
        self.running.insert(
            record.program,
            Running {
                info,
                status: record.status,
                counters,
                carried: super::DispatchCounts::default(),
            },
        );
        Some(adopted)
    }
}

/// Checks that each recorded link is pinned and runs the recorded program; an XDP or
/// TCX link left pointing elsewhere (an update cut short) is switched back.
fn verify_links(info: &RunningInfo) -> (bool, Option<String>) {
    use aya::programs::links::PinnedLink;
    let mut notes = Vec::new();
    let mut consistent = true;
    for link in &info.links {
        if link.netlink.is_some() {
            // A legacy tc filter has no pin to check; it lives until removed.
            continue;
        }
        let path = info.pin_dir.join(&link.pin);
        let found = PinnedLink::from_pin(&path)
            .map_err(|e| super::error::chain(&e))
            .and_then(|p| {
                aya::programs::links::FdLink::from(p)
                    .info()
                    .map(|i| i.program_id())
                    .map_err(|e| super::error::chain(&e))
            });
        match found {
            Ok(id) if id == link.program_id => {}
            Ok(id) if link.kind == "xdp" || link.kind == "tc" => {
                let change = attach::Change::Replaced {
                    xdp: link.kind == "xdp",
                    link_pin: path.clone(),
                    prog_pin: info.pin_dir.join(pins::program_pin(&link.program)),
                };
                match attach::revert(vec![change]).first() {
                    None => notes.push(format!(
                        "{} link on {} ran program {id}, switched back to {}",
                        link.kind, link.target, link.program_id
                    )),
                    Some(e) => {
                        consistent = false;
                        notes.push(e.clone());
                    }
                }
            }
            Ok(id) => {
                consistent = false;
                notes.push(format!(
                    "{} link {} runs program {id}, recorded {}",
                    link.kind, link.pin, link.program_id
                ));
            }
            Err(e) => {
                consistent = false;
                notes.push(format!("{} link {}: {e}", link.kind, link.pin));
            }
        }
    }
    (consistent, (!notes.is_empty()).then(|| notes.join("; ")))
}
