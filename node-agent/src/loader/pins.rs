//! The pin layout on bpffs and what is recorded there.
//!
//! ```text
//! <root>/<program>/<digest>/      one directory per loaded assignment
//!     meta                        ARRAY map: JSON record (digest, status, links); written last
//!     prog_<name>                 every program that runs (entry, attached, handlers)
//!     link_<prog>_<kind>_<target> every attachment (bpf_link), so it outlives the agent
//!     jump_table                  the PROG_ARRAY (tail calls): pinned, or the kernel empties it
//!     bpfpoly_dispatch            per-CPU dispatch counters, for metrics after a restart
//!     map_<name>                  the object's other maps (stats, event buffers), for
//!                                 readers; shared with a freplace handler object
//! ```
//!
//! Pins are what keeps things alive: links keep programs attached, the pinned
//! PROG_ARRAY keeps its entries (the kernel empties it when the last user reference
//! goes), and nothing depends on the agent's file descriptors, so SIGTERM or SIGKILL
//! leaves everything running. Removing the directory detaches and unloads it all.
//!
//! bpffs refuses names containing `.`, so names are escaped (`.` and anything
//! outside `[A-Za-z0-9_-]` become `+`). The record in `meta` is the source of truth
//! for names; directory names are only for humans and lookups.

use std::{
    fs, io,
    path::{Path, PathBuf},
    process::Command,
};

use aya::{
    maps::{Array, Map, MapData},
    programs::links::FdLink,
};
use aya_obj::{
    maps::{bpf_map_def, LegacyMap, PinningType},
    EbpfSectionKind,
};
use serde::{Deserialize, Serialize};

use super::error::chain;
use crate::sys::{detach_pinned_link, ENOTSUPP};

/// The record of a loaded assignment.
pub(super) const META_PIN: &str = "meta";
/// The tail-call table.
pub(super) const TABLE_PIN: &str = "jump_table";
/// The dispatch counters.
pub(super) const DISPATCH_PIN: &str = "bpfpoly_dispatch";

/// Value size of the `meta` map; the JSON is split over as many entries as it needs.
const META_VALUE: usize = 4096;
/// `BPF_MAP_TYPE_ARRAY`.
const MAP_TYPE_ARRAY: u32 = 2;
/// The record format.
pub(super) const META_VERSION: u32 = 1;
/// Bound on the record size (a status with 32 verifier-log excerpts fits easily).
const META_MAX_ENTRIES: u32 = 256;

/// Escapes a name for bpffs: `.` (refused by bpffs) and anything unusual become `+`.
pub(super) fn escape(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '+'
            }
        })
        .collect()
}

/// Pin name of a program.
pub(super) fn program_pin(name: &str) -> String {
    format!("prog_{}", escape(name))
}

/// Pin name of a map shared with a freplace handler object.
pub(super) fn shared_map_pin(name: &str) -> String {
    format!("map_{}", escape(name))
}

/// One attachment of a running program.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LinkRecord {
    /// Program (C function name).
    pub program: String,
    /// `xdp`, `tc`, `tracepoint`, `tpBtf`, `rawTracepoint`, `kprobe`, `fentry`, `fexit`, `freplace`.
    pub kind: String,
    /// Interface, tracepoint, function or slot.
    pub target: String,
    /// XDP mode (`skb`/`driver`) or TC direction (`ingress`/`egress`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// Pin file name in the program's directory.
    pub pin: String,
    /// Kernel link id.
    pub link_id: u32,
    /// Kernel id of the program the link runs.
    pub program_id: u32,
    /// Legacy tc (kernels before 6.6 have no TCX): the cls_bpf filter on the interface's
    /// clsact qdisc. It has no link to pin (`pin` is empty); `remove_dir` detaches it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netlink: Option<NetlinkFilter>,
}

/// A legacy tc filter: what identifies it on its interface and hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetlinkFilter {
    /// Filter priority (chosen by the kernel at attach).
    pub priority: u16,
    /// Filter handle (`major << 16 | minor`, chosen by the kernel at attach).
    pub handle: u32,
}

/// Records a legacy tc filter of `program` (attached through netlink) on `iface`.
pub(super) fn netlink_record(
    program: &str,
    iface: &str,
    direction: &str,
    program_id: u32,
    filter: NetlinkFilter,
) -> LinkRecord {
    LinkRecord {
        program: program.to_owned(),
        kind: "tc".to_owned(),
        target: iface.to_owned(),
        mode: Some(direction.to_owned()),
        pin: String::new(),
        link_id: 0,
        program_id,
        netlink: Some(filter),
    }
}

/// Detaches the legacy tc filters recorded in `links`. A filter already gone (its
/// interface deleted) is fine; other errors are returned.
pub(super) fn detach_netlink(links: &[LinkRecord]) -> Result<(), String> {
    use aya::programs::{
        links::Link,
        tc::{SchedClassifierLink, TcHandle},
        TcAttachType,
    };
    let mut errors = Vec::new();
    for link in links {
        let Some(filter) = link.netlink else {
            continue;
        };
        let attach_type = match link.mode.as_deref() {
            Some("egress") => TcAttachType::Egress,
            _ => TcAttachType::Ingress,
        };
        let handle = TcHandle::new((filter.handle >> 16) as u16, filter.handle as u16);
        let detached =
            SchedClassifierLink::attached(&link.target, attach_type, filter.priority, handle, None)
                .map_err(|e| e.to_string())
                .and_then(|l| l.detach().map_err(|e| chain(&e)));
        match detached {
            Ok(()) => {}
            Err(_) if !Path::new("/sys/class/net").join(&link.target).exists() => {}
            Err(e) => errors.push(format!(
                "detaching the tc filter of {:?} on {}: {e}",
                link.program, link.target
            )),
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

/// The links in a `meta` record as `record.rs` writes it: `{"info": {"links": [...]}}`.
pub(super) fn record_links(json: &[u8]) -> Option<Vec<LinkRecord>> {
    #[derive(Deserialize)]
    struct Record {
        info: Info,
    }
    #[derive(Deserialize)]
    struct Info {
        #[serde(default)]
        links: Vec<LinkRecord>,
    }
    serde_json::from_slice::<Record>(json)
        .ok()
        .map(|r| r.info.links)
}

/// The link records under `dir` (a version directory with its `meta`, or a program
/// directory holding such directories), each with the directory that holds its pin.
/// Unreadable records are skipped: their pins still go with the directory.
fn recorded_links(dir: &Path) -> Vec<(PathBuf, LinkRecord)> {
    let mut dirs = vec![dir.to_path_buf()];
    if let Ok(entries) = fs::read_dir(dir) {
        dirs.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
    }
    let mut links = Vec::new();
    for d in dirs {
        if !d.join(META_PIN).exists() {
            continue;
        }
        let Ok(json) = read_meta(&d) else { continue };
        let Some(record) = record_links(&json) else {
            continue;
        };
        links.extend(record.into_iter().map(|l| (d.clone(), l)));
    }
    links
}

/// Detaches every bpf_link of `links` (as recorded under a directory) before its pins
/// go, so that nothing of it runs once the removal returns (an unpinned link is detached
/// later, by a kernel work item). Only for a program removed as a whole: a version being retired may pin a
/// link that was updated in place and now runs its successor. Kinds the kernel cannot
/// detach (`EOPNOTSUPP`, or `EINVAL` before Linux 5.9) are left to the unpin.
fn detach_links(links: &[(PathBuf, LinkRecord)]) -> Vec<String> {
    let mut errors = Vec::new();
    for (d, link) in links {
        if link.netlink.is_some() || link.pin.is_empty() {
            continue;
        }
        let pin = d.join(&link.pin);
        match detach_pinned_link(&pin) {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP | libc::EINVAL | libc::ENOENT | ENOTSUPP)
                ) => {}
            Err(e) => errors.push(format!("detaching {}: {e}", pin.display())),
        }
    }
    errors
}

/// Pins `link` as `link_<program>_<kind>_<target>` in `dir` and records it.
pub(super) fn pin_link(
    link: FdLink,
    dir: &Path,
    program: &str,
    kind: &str,
    target: &str,
    mode: Option<&str>,
) -> Result<LinkRecord, String> {
    let info = link
        .info()
        .map_err(|e| format!("reading link info: {}", chain(&e)))?;
    let pin = format!(
        "link_{}_{}_{}",
        escape(program),
        escape(kind),
        escape(target)
    );
    let pin = match mode {
        Some(m) if kind == "tc" => format!("{pin}_{m}"),
        _ => pin,
    };
    link.pin(dir.join(&pin))
        .map_err(|e| format!("pinning the {kind} link of {program:?}: {}", chain(&e)))?;
    Ok(LinkRecord {
        program: program.to_owned(),
        kind: kind.to_owned(),
        target: target.to_owned(),
        mode: mode.map(str::to_owned),
        pin,
        link_id: info.id(),
        program_id: info.program_id(),
        netlink: None,
    })
}

/// Removes everything in `dir` (an attempt's directory), keeping the directory.
pub(super) fn empty_dir(dir: &Path) -> Result<(), String> {
    let entries = fs::read_dir(dir).map_err(|e| format!("listing {}: {e}", dir.display()))?;
    for entry in entries {
        let path = entry
            .map_err(|e| format!("listing {}: {e}", dir.display()))?
            .path();
        let result = if path.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        result.map_err(|e| format!("removing {}: {e}", path.display()))?;
    }
    Ok(())
}

/// Removes `dir` and everything pinned under it, detaching its legacy tc filters
/// first (unpinning does not); a missing directory is fine.
pub(super) fn remove_dir(dir: &Path) -> io::Result<()> {
    remove_recorded(dir, false)
}

/// Removes a program as a whole: detaches each of its recorded links, then removes
/// `dir` as [`remove_dir`] does. A link that would not detach is still unpinned, and
/// the kernel detaches it shortly after; the error says which.
pub(super) fn remove_program_dir(dir: &Path) -> io::Result<()> {
    remove_recorded(dir, true)
}

/// Reads the records under `dir` once, detaches the legacy tc filters (and, with
/// `detach_fd_links`, the bpf_links) they name, and removes `dir`.
fn remove_recorded(dir: &Path, detach_fd_links: bool) -> io::Result<()> {
    let links = recorded_links(dir);
    let errors = if detach_fd_links {
        detach_links(&links)
    } else {
        Vec::new()
    };
    let records: Vec<LinkRecord> = links.into_iter().map(|(_, l)| l).collect();
    detach_netlink(&records).map_err(io::Error::other)?;
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        other => other?,
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(io::Error::other(errors.join("; ")))
    }
}

/// Writes `json` into a new `meta` ARRAY map pinned in `dir`.
pub(super) fn write_meta(dir: &Path, json: &[u8]) -> Result<(), String> {
    let total = json.len() + 4;
    let entries = total.div_ceil(META_VALUE);
    let entries = u32::try_from(entries)
        .ok()
        .filter(|&n| n <= META_MAX_ENTRIES)
        .ok_or_else(|| format!("the record is too large ({} bytes)", json.len()))?;
    let def = bpf_map_def {
        map_type: MAP_TYPE_ARRAY,
        key_size: 4,
        value_size: META_VALUE as u32,
        max_entries: entries,
        map_flags: 0,
        id: 0,
        pinning: PinningType::None,
    };
    let obj = aya_obj::Map::Legacy(LegacyMap {
        def,
        inner_def: None,
        section_index: 0,
        section_kind: EbpfSectionKind::Maps,
        symbol_index: None,
        data: Vec::new(),
    });
    let data = MapData::create(obj, "bpfpoly_meta", None)
        .map_err(|e| format!("creating the meta map: {}", chain(&e)))?;
    let mut map = Map::from_map_data(data).map_err(|e| format!("meta map: {}", chain(&e)))?;
    let mut array: Array<&mut MapData, [u8; META_VALUE]> =
        Array::try_from(&mut map).map_err(|e| format!("meta map: {}", chain(&e)))?;
    let mut bytes = Vec::with_capacity(entries as usize * META_VALUE);
    bytes.extend_from_slice(&(json.len() as u32).to_ne_bytes());
    bytes.extend_from_slice(json);
    bytes.resize(entries as usize * META_VALUE, 0);
    for (index, chunk) in bytes.chunks(META_VALUE).enumerate() {
        let mut value = [0u8; META_VALUE];
        value.copy_from_slice(chunk);
        array
            .set(index as u32, value, 0)
            .map_err(|e| format!("writing the meta map: {}", chain(&e)))?;
    }
    // Pinned once complete: a directory without `meta` is an interrupted attempt.
    map.pin(dir.join(META_PIN))
        .map_err(|e| format!("pinning the meta map: {}", chain(&e)))
}

/// Reads the JSON written by `write_meta`.
pub(super) fn read_meta(dir: &Path) -> Result<Vec<u8>, String> {
    let path = dir.join(META_PIN);
    let data =
        MapData::from_pin(&path).map_err(|e| format!("{}: {}", path.display(), chain(&e)))?;
    let map = Map::from_map_data(data).map_err(|e| format!("{}: {}", path.display(), chain(&e)))?;
    let array: Array<MapData, [u8; META_VALUE]> =
        Array::try_from(map).map_err(|e| format!("{}: {}", path.display(), chain(&e)))?;
    let mut bytes = Vec::new();
    for index in 0..array.len() {
        let value = array
            .get(&index, 0)
            .map_err(|e| format!("{}: {}", path.display(), chain(&e)))?;
        bytes.extend_from_slice(&value);
    }
    let len = bytes
        .get(..4)
        .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or_else(|| format!("{}: empty record", path.display()))?;
    bytes
        .get(4..4 + len)
        .map(<[u8]>::to_vec)
        .ok_or_else(|| format!("{}: truncated record", path.display()))
}

/// The filesystem type mounted at the mount point that holds `path`.
fn fs_type_of(path: &Path) -> Option<(PathBuf, String)> {
    let mounts = fs::read_to_string("/proc/self/mounts").ok()?;
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
            // /proc/mounts escapes spaces as \040; bpffs paths have none.
            let dir = PathBuf::from(dir.replace("\\040", " "));
            path.starts_with(&dir).then(|| (dir, fstype.to_owned()))
        })
        .max_by_key(|(dir, _)| dir.components().count())
}

/// Makes sure `root` is on a bpffs, mounting `/sys/fs/bpf` when it is not mounted.
pub(super) fn ensure_bpffs(root: &Path) -> Result<(), String> {
    const BPFFS: &str = "/sys/fs/bpf";
    if fs_type_of(root).is_some_and(|(_, t)| t == "bpf") {
        return Ok(());
    }
    if root.starts_with(BPFFS) && fs_type_of(Path::new(BPFFS)).is_none_or(|(_, t)| t != "bpf") {
        mount("bpf", BPFFS)?;
    }
    match fs_type_of(root) {
        Some((_, t)) if t == "bpf" => Ok(()),
        Some((dir, t)) => Err(format!(
            "{} is on {t} (mounted at {}), not bpffs: pins would not outlive the agent",
            root.display(),
            dir.display()
        )),
        None => Err(format!("{} is on no mounted filesystem", root.display())),
    }
}

/// Mounts tracefs at /sys/kernel/tracing when it is not (tracepoint attach reads it).
pub(super) fn ensure_tracefs() -> Result<(), String> {
    const TRACEFS: &str = "/sys/kernel/tracing";
    if fs_type_of(Path::new(TRACEFS))
        .is_some_and(|(dir, t)| t == "tracefs" && dir == Path::new(TRACEFS))
    {
        return Ok(());
    }
    mount("tracefs", TRACEFS)
}

fn mount(fstype: &str, target: &str) -> Result<(), String> {
    let output = Command::new("mount")
        .args(["-t", fstype, fstype, target])
        .output()
        .map_err(|e| format!("running mount -t {fstype} {fstype} {target}: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "mount -t {fstype} {fstype} {target} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}
