//! Attaching a loaded candidate and pinning its links, make-before-break: where the
//! running version has an XDP or TCX link on the same interface, the link is
//! switched to the new program atomically (BPF_LINK_UPDATE), so the hook never runs
//! without a program and never runs two; other attachments are made next to the old
//! ones, which go when the old directory is removed. A failed switch is reverted.

use std::path::{Path, PathBuf};

use aya::{
    programs::{
        links::{FdLink, PinnedLink},
        tc::{qdisc_add_clsact, NlOptions, SchedClassifierLink, TcAttachOptions, TcError},
        xdp::XdpLink,
        BtfTracePoint, FEntry, FExit, KProbe, LinkOrder, RawTracePoint, SchedClassifier,
        TcAttachType, TracePoint, Xdp, XdpMode,
    },
    Ebpf,
};
use aya_obj::programs::XdpAttachType;
use bpfpoly_crds::{
    program::{Attach, TcDirection, Variant, XdpMode as ApiXdpMode},
    state::FallbackStage,
};

use super::{
    candidate::{chain, Failure},
    object::AttachKind,
    pins::{self, LinkRecord},
};

/// Where the kernel lists the kprobe PMU; missing without CONFIG_KPROBES.
const KPROBE_PMU: &str = "/sys/bus/event_source/devices/kprobe/type";

/// The running version's links, for in-place updates.
pub(super) struct Previous<'a> {
    pub dir: &'a Path,
    pub links: &'a [LinkRecord],
}

/// A change made to the running version's links, undone if the update fails.
pub(super) enum Change {
    /// The link at `link_pin` now runs the new program; `prog_pin` is the old one.
    Replaced {
        xdp: bool,
        link_pin: PathBuf,
        prog_pin: PathBuf,
    },
    /// The old XDP link was removed first (the mode changed, so no atomic update).
    Detached {
        interface: String,
        mode: XdpMode,
        link_pin: PathBuf,
        prog_pin: PathBuf,
    },
}

fn attach_failure(program: &str, what: &str, e: &dyn std::error::Error) -> Failure {
    Failure::new(
        FallbackStage::Attach,
        format!("attaching {program:?} {what}: {}", chain(e)),
    )
}

fn pin_failure(reason: String) -> Failure {
    Failure::new(FallbackStage::Attach, reason)
}

/// Interfaces are checked up front for a clear message (aya's is terse).
fn interface_exists(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && Path::new("/sys/class/net").join(name).exists()
}

fn missing_interface(program: &str, kind: &str, iface: &str) -> Failure {
    Failure::new(
        FallbackStage::Attach,
        format!("interface {iface:?} not found on this node ({kind} attach of {program:?})"),
    )
}

fn xdp_mode(mode: ApiXdpMode) -> (XdpMode, &'static str) {
    match mode {
        ApiXdpMode::Skb => (XdpMode::Skb, "skb"),
        ApiXdpMode::Driver => (XdpMode::Driver, "driver"),
    }
}

/// Attaches every program of `variant` that has an `attach`, pinning the links in `dir`.
/// `changes` collects what was done to the previous version, for `revert`.
pub(super) fn attach_variant(
    ebpf: &mut Ebpf,
    variant: &Variant,
    dir: &Path,
    previous: Option<&Previous<'_>>,
    changes: &mut Vec<Change>,
) -> Result<Vec<LinkRecord>, Failure> {
    let mut records = Vec::new();
    let mut used = vec![false; previous.map_or(0, |p| p.links.len())];
    for program in &variant.programs {
        let Some(attach) = program.attach.as_ref() else {
            continue;
        };
        let Some(kind) = AttachKind::of(attach) else {
            continue;
        };
        let name = program.name.as_str();
        let prog = ebpf.program_mut(name).ok_or_else(|| {
            Failure::new(
                FallbackStage::Attach,
                format!("program {name:?} is not loaded"),
            )
        })?;
        let wrong_type = |e: aya::programs::ProgramError| attach_failure(name, kind.field(), &e);
        match kind {
            AttachKind::Xdp => {
                let xdp: &mut Xdp = prog.try_into().map_err(wrong_type)?;
                attach_xdp(
                    xdp,
                    name,
                    attach,
                    dir,
                    previous,
                    &mut used,
                    changes,
                    &mut records,
                )?;
            }
            AttachKind::Tc => {
                let tc: &mut SchedClassifier = prog.try_into().map_err(wrong_type)?;
                attach_tc(
                    tc,
                    name,
                    attach,
                    dir,
                    previous,
                    &mut used,
                    changes,
                    &mut records,
                )?;
            }
            AttachKind::TracePoint => {
                let tp: &mut TracePoint = prog.try_into().map_err(wrong_type)?;
                let Some(target) = attach.tracepoint.as_ref() else {
                    continue;
                };
                let what = format!("to tracepoint {}/{}", target.category, target.name);
                let id = tp
                    .attach(&target.category, &target.name)
                    .map_err(|e| attach_failure(name, &what, &e))?;
                let link = tp
                    .take_link(id)
                    .map_err(|e| attach_failure(name, &what, &e))?;
                let link = FdLink::try_from(link).map_err(|e| attach_failure(name, &what, &e))?;
                let target = format!("{}/{}", target.category, target.name);
                records.push(
                    pins::pin_link(link, dir, name, "tracepoint", &target, None)
                        .map_err(pin_failure)?,
                );
            }
            AttachKind::TpBtf => {
                let tp: &mut BtfTracePoint = prog.try_into().map_err(wrong_type)?;
                let target = attach
                    .tp_btf
                    .as_ref()
                    .map(|t| t.name.as_str())
                    .unwrap_or_default();
                let what = format!("to tp_btf/{target}");
                let id = tp.attach().map_err(|e| attach_failure(name, &what, &e))?;
                let link: FdLink = tp
                    .take_link(id)
                    .map_err(|e| attach_failure(name, &what, &e))?
                    .into();
                records.push(
                    pins::pin_link(link, dir, name, "tpBtf", target, None).map_err(pin_failure)?,
                );
            }
            AttachKind::RawTracePoint => {
                let tp: &mut RawTracePoint = prog.try_into().map_err(wrong_type)?;
                let target = attach
                    .raw_tracepoint
                    .as_ref()
                    .map(|t| t.name.as_str())
                    .unwrap_or_default();
                let what = format!("to raw_tp/{target}");
                let id = tp
                    .attach(target)
                    .map_err(|e| attach_failure(name, &what, &e))?;
                let link: FdLink = tp
                    .take_link(id)
                    .map_err(|e| attach_failure(name, &what, &e))?
                    .into();
                records.push(
                    pins::pin_link(link, dir, name, "rawTracepoint", target, None)
                        .map_err(pin_failure)?,
                );
            }
            AttachKind::KProbe => {
                let kp: &mut KProbe = prog.try_into().map_err(wrong_type)?;
                let Some(target) = attach.kprobe.as_ref() else {
                    continue;
                };
                let what = format!("as kprobe to {}+{}", target.function, target.offset);
                let id = kp.attach(&target.function, target.offset).map_err(|e| {
                    let mut f = attach_failure(name, &what, &e);
                    if !Path::new(KPROBE_PMU).exists() {
                        f.reason
                            .push_str(" (this kernel has no kprobes: CONFIG_KPROBES is off)");
                    }
                    f
                })?;
                let link = kp
                    .take_link(id)
                    .map_err(|e| attach_failure(name, &what, &e))?;
                let link = FdLink::try_from(link).map_err(|e| attach_failure(name, &what, &e))?;
                records.push(
                    pins::pin_link(link, dir, name, "kprobe", &target.function, None)
                        .map_err(pin_failure)?,
                );
            }
            AttachKind::FEntry => {
                let p: &mut FEntry = prog.try_into().map_err(wrong_type)?;
                let target = attach
                    .fentry
                    .as_ref()
                    .map(|t| t.function.as_str())
                    .unwrap_or_default();
                let what = format!("as fentry to {target}");
                let id = p.attach().map_err(|e| attach_failure(name, &what, &e))?;
                let link: FdLink = p
                    .take_link(id)
                    .map_err(|e| attach_failure(name, &what, &e))?
                    .into();
                records.push(
                    pins::pin_link(link, dir, name, "fentry", target, None).map_err(pin_failure)?,
                );
            }
            AttachKind::FExit => {
                let p: &mut FExit = prog.try_into().map_err(wrong_type)?;
                let target = attach
                    .fexit
                    .as_ref()
                    .map(|t| t.function.as_str())
                    .unwrap_or_default();
                let what = format!("as fexit to {target}");
                let id = p.attach().map_err(|e| attach_failure(name, &what, &e))?;
                let link: FdLink = p
                    .take_link(id)
                    .map_err(|e| attach_failure(name, &what, &e))?
                    .into();
                records.push(
                    pins::pin_link(link, dir, name, "fexit", target, None).map_err(pin_failure)?,
                );
            }
        }
    }
    Ok(records)
}

#[allow(clippy::too_many_arguments)]
fn attach_xdp(
    xdp: &mut Xdp,
    name: &str,
    attach: &Attach,
    dir: &Path,
    previous: Option<&Previous<'_>>,
    used: &mut [bool],
    changes: &mut Vec<Change>,
    records: &mut Vec<LinkRecord>,
) -> Result<(), Failure> {
    let Some(target) = attach.xdp.as_ref() else {
        return Ok(());
    };
    let (mode, mode_name) = xdp_mode(target.mode);
    for iface in &target.interfaces {
        if !interface_exists(iface) {
            return Err(missing_interface(name, "xdp", iface));
        }
        let what = format!("as xdp ({mode_name}) to {iface}");
        let fail = |e: &dyn std::error::Error| attach_failure(name, &what, e);
        // One XDP program per interface: the running version's link there, if any.
        let old = previous.and_then(|p| {
            p.links
                .iter()
                .enumerate()
                .find(|(i, l)| !used[*i] && l.kind == "xdp" && l.target == *iface)
                .map(|(i, l)| (i, l, p.dir))
        });
        let id = match old {
            Some((i, old, old_dir)) if old.mode.as_deref() == Some(mode_name) => {
                used[i] = true;
                let link_pin = old_dir.join(&old.pin);
                let pinned = PinnedLink::from_pin(&link_pin).map_err(|e| fail(&e))?;
                let link = XdpLink::try_from(FdLink::from(pinned)).map_err(|e| fail(&e))?;
                let id = xdp.attach_to_link(link).map_err(|e| fail(&e))?;
                changes.push(Change::Replaced {
                    xdp: true,
                    link_pin,
                    prog_pin: old_dir.join(pins::program_pin(&old.program)),
                });
                id
            }
            Some((i, old, old_dir)) => {
                // Native and generic XDP cannot be active together: break, then make.
                used[i] = true;
                let link_pin = old_dir.join(&old.pin);
                std::fs::remove_file(&link_pin).map_err(|e| fail(&e))?;
                changes.push(Change::Detached {
                    interface: iface.clone(),
                    mode: if old.mode.as_deref() == Some("driver") {
                        XdpMode::Driver
                    } else {
                        XdpMode::Skb
                    },
                    link_pin,
                    prog_pin: old_dir.join(pins::program_pin(&old.program)),
                });
                xdp.attach(iface, mode).map_err(|e| fail(&e))?
            }
            None => xdp.attach(iface, mode).map_err(|e| fail(&e))?,
        };
        let link = xdp.take_link(id).map_err(|e| fail(&e))?;
        let link = FdLink::try_from(link).map_err(|e| {
            attach_failure(name, &format!("{what} (no bpf_link, cannot be pinned)"), &e)
        })?;
        records.push(
            pins::pin_link(link, dir, name, "xdp", iface, Some(mode_name)).map_err(pin_failure)?,
        );
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn attach_tc(
    tc: &mut SchedClassifier,
    name: &str,
    attach: &Attach,
    dir: &Path,
    previous: Option<&Previous<'_>>,
    used: &mut [bool],
    changes: &mut Vec<Change>,
    records: &mut Vec<LinkRecord>,
) -> Result<(), Failure> {
    let Some(target) = attach.tc.as_ref() else {
        return Ok(());
    };
    let (attach_type, direction) = match target.direction {
        TcDirection::Ingress => (TcAttachType::Ingress, "ingress"),
        TcDirection::Egress => (TcAttachType::Egress, "egress"),
    };
    for iface in &target.interfaces {
        if !interface_exists(iface) {
            return Err(missing_interface(name, "tc", iface));
        }
        let what = format!("as tcx {direction} to {iface}");
        let fail = |e: &dyn std::error::Error| attach_failure(name, &what, e);
        let old = previous.and_then(|p| {
            p.links
                .iter()
                .enumerate()
                .find(|(i, l)| {
                    !used[*i]
                        && l.kind == "tc"
                        && l.netlink.is_none()
                        && l.target == *iface
                        && l.mode.as_deref() == Some(direction)
                        && l.program == name
                })
                .map(|(i, l)| (i, l, p.dir))
        });
        let id = match old {
            Some((i, old, old_dir)) => {
                used[i] = true;
                let link_pin = old_dir.join(&old.pin);
                let pinned = PinnedLink::from_pin(&link_pin).map_err(|e| fail(&e))?;
                let link =
                    SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(|e| fail(&e))?;
                let id = tc.attach_to_link(link).map_err(|e| fail(&e))?;
                changes.push(Change::Replaced {
                    xdp: false,
                    link_pin,
                    prog_pin: old_dir.join(pins::program_pin(&old.program)),
                });
                id
            }
            None => match tc.attach_with_options(
                iface,
                attach_type,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            ) {
                Ok(id) => id,
                // No TCX before 6.6 (BPF_LINK_CREATE answers EINVAL there): a cls_bpf
                // filter on the clsact qdisc instead, made next to any older one.
                Err(tcx) => {
                    records.push(attach_tc_netlink(
                        tc,
                        name,
                        iface,
                        attach_type,
                        direction,
                        &tcx,
                    )?);
                    continue;
                }
            },
        };
        let link = tc.take_link(id).map_err(|e| fail(&e))?;
        let link = FdLink::try_from(link).map_err(|e| fail(&e))?;
        records.push(
            pins::pin_link(link, dir, name, "tc", iface, Some(direction)).map_err(pin_failure)?,
        );
    }
    Ok(())
}

/// Legacy tc: the clsact qdisc (made if missing) and a direct-action cls_bpf filter.
/// The filter is recorded by priority and handle and stays attached when the agent
/// lets go of it; `pins::remove_dir` detaches it.
fn attach_tc_netlink(
    tc: &mut SchedClassifier,
    name: &str,
    iface: &str,
    attach_type: TcAttachType,
    direction: &str,
    tcx: &dyn std::error::Error,
) -> Result<LinkRecord, Failure> {
    let what = format!(
        "as a tc (netlink) {direction} filter on {iface} after TCX failed ({})",
        chain(tcx)
    );
    let fail = |e: &dyn std::error::Error| attach_failure(name, &what, e);
    if let Err(e) = qdisc_add_clsact(iface) {
        // EEXIST: the qdisc is there already (another program, or an earlier version).
        let exists = matches!(&e, TcError::NetlinkError(n)
            if n.raw_os_error().map(|c| std::io::Error::from_raw_os_error(c).kind())
                == Some(std::io::ErrorKind::AlreadyExists));
        if !exists {
            return Err(fail(&e));
        }
    }
    let id = tc
        .attach_with_options(
            iface,
            attach_type,
            TcAttachOptions::Netlink(NlOptions::default()),
        )
        .map_err(|e| fail(&e))?;
    let link = tc.take_link(id).map_err(|e| fail(&e))?;
    let filter = pins::NetlinkFilter {
        priority: link.priority().map_err(|e| fail(&e))?,
        handle: link.handle().map_err(|e| fail(&e))?.into(),
    };
    let program_id = tc.info().map_err(|e| fail(&e))?.id();
    // Dropping the link would detach the filter: it lives on, recorded, until removed.
    std::mem::forget(link);
    Ok(pins::netlink_record(
        name, iface, direction, program_id, filter,
    ))
}

/// Undoes `changes`, newest first: links go back to the previous programs. Returns
/// what could not be undone.
pub(super) fn revert(changes: Vec<Change>) -> Vec<String> {
    let mut errors = Vec::new();
    for change in changes.into_iter().rev() {
        if let Err(e) = revert_one(&change) {
            errors.push(e);
        }
    }
    errors
}

fn revert_one(change: &Change) -> Result<(), String> {
    match change {
        Change::Replaced {
            xdp: true,
            link_pin,
            prog_pin,
        } => {
            let err = |e: &dyn std::error::Error| {
                format!(
                    "restoring the XDP link {}: {}",
                    link_pin.display(),
                    chain(e)
                )
            };
            let mut old = Xdp::from_pin(prog_pin, XdpAttachType::Interface).map_err(|e| err(&e))?;
            let link = PinnedLink::from_pin(link_pin).map_err(|e| err(&e))?;
            let link = XdpLink::try_from(FdLink::from(link)).map_err(|e| err(&e))?;
            let id = old.attach_to_link(link).map_err(|e| err(&e))?;
            // Still pinned at link_pin; dropping our handle keeps it attached.
            let _ = old.take_link(id).map(FdLink::try_from);
            Ok(())
        }
        Change::Replaced {
            xdp: false,
            link_pin,
            prog_pin,
        } => {
            let err = |e: &dyn std::error::Error| {
                format!(
                    "restoring the TCX link {}: {}",
                    link_pin.display(),
                    chain(e)
                )
            };
            let mut old = SchedClassifier::from_pin(prog_pin).map_err(|e| err(&e))?;
            let link = PinnedLink::from_pin(link_pin).map_err(|e| err(&e))?;
            let link = SchedClassifierLink::try_from(FdLink::from(link)).map_err(|e| err(&e))?;
            let id = old.attach_to_link(link).map_err(|e| err(&e))?;
            let _ = old.take_link(id).map(FdLink::try_from);
            Ok(())
        }
        Change::Detached {
            interface,
            mode,
            link_pin,
            prog_pin,
        } => {
            let err = |e: &dyn std::error::Error| {
                format!(
                    "re-attaching the previous XDP program to {interface}: {}",
                    chain(e)
                )
            };
            let mut old = Xdp::from_pin(prog_pin, XdpAttachType::Interface).map_err(|e| err(&e))?;
            let id = old.attach(interface, *mode).map_err(|e| err(&e))?;
            let link = old.take_link(id).map_err(|e| err(&e))?;
            let link = FdLink::try_from(link).map_err(|e| err(&e))?;
            link.pin(link_pin).map_err(|e| err(&e))?;
            Ok(())
        }
    }
}
