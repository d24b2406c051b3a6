//! Attaching a loaded candidate and pinning its links, make-before-break: where the
//! running version has an XDP or TCX link on the same interface, the link is
//! switched to the new program atomically (BPF_LINK_UPDATE), so the hook never runs
//! without a program and never runs two; other attachments are made next to the old
//! ones, which go when the old directory is removed. A failed switch is reverted.

use std::path::{Path, PathBuf};

use aya::{
    programs::{
        links::{FdLink, LinkError, PinnedLink},
        tc::{
            qdisc_add_clsact, NlOptions, SchedClassifierLink, SchedClassifierLinkId,
            TcAttachOptions, TcError,
        },
        xdp::{XdpLink, XdpLinkId},
        BtfTracePoint, FEntry, FExit, KProbe, LinkOrder, Program, ProgramError, RawTracePoint,
        SchedClassifier, TcAttachType, TracePoint, Xdp, XdpMode,
    },
    Ebpf,
};
use aya_obj::programs::XdpAttachType;
use bpfpoly_crds::{
    program::{Attach, TcDirection, Variant, XdpMode as ApiXdpMode},
    state::FallbackStage,
};

use super::{
    candidate::Failure,
    error::chain,
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
    let mut hooks = Hooks {
        dir,
        previous,
        used: vec![false; previous.map_or(0, |p| p.links.len())],
        changes,
        records: Vec::new(),
    };
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
        hooks.attach(prog, kind, name, attach)?;
    }
    Ok(hooks.records)
}

/// One variant's attachments in progress: where links are pinned, the previous version's
/// links (each switched at most once), the changes made to them, and the new records.
struct Hooks<'a, 'p> {
    dir: &'a Path,
    previous: Option<&'a Previous<'p>>,
    used: Vec<bool>,
    changes: &'a mut Vec<Change>,
    records: Vec<LinkRecord>,
}

/// `attach` then `take_link` of one program, the errors naming the program and the hook.
macro_rules! attach_and_take {
    ($prog:expr, $name:expr, $what:expr, $attach:expr) => {{
        let id = $attach.map_err(|e| attach_failure($name, $what, &e))?;
        $prog
            .take_link(id)
            .map_err(|e| attach_failure($name, $what, &e))?
    }};
}

/// `$prog` as a `$ty`, attached by `$attach` (with the program as `$p`), its link taken as
/// an [`FdLink`] (tp_btf, raw_tp, fentry and fexit links are all fd links).
macro_rules! fd_link {
    ($prog:expr, $ty:ty, $name:expr, $what:expr, $wrong_type:expr, |$p:ident| $attach:expr) => {{
        let $p: &mut $ty = $prog.try_into().map_err($wrong_type)?;
        let link = attach_and_take!($p, $name, $what, $attach);
        FdLink::from(link)
    }};
}

impl<'p> Hooks<'_, 'p> {
    fn attach(
        &mut self,
        prog: &mut Program,
        kind: AttachKind,
        name: &str,
        attach: &Attach,
    ) -> Result<(), Failure> {
        let wrong_type = |e: ProgramError| attach_failure(name, kind.field(), &e);
        match kind {
            AttachKind::Xdp => self.xdp(prog.try_into().map_err(wrong_type)?, name, attach),
            AttachKind::Tc => self.tc(prog.try_into().map_err(wrong_type)?, name, attach),
            AttachKind::TracePoint => {
                let tp: &mut TracePoint = prog.try_into().map_err(wrong_type)?;
                let Some(t) = attach.tracepoint.as_ref() else {
                    return Ok(());
                };
                let what = format!("to tracepoint {}/{}", t.category, t.name);
                let link = attach_and_take!(tp, name, &what, tp.attach(&t.category, &t.name));
                let link = FdLink::try_from(link).map_err(|e| attach_failure(name, &what, &e))?;
                let target = format!("{}/{}", t.category, t.name);
                self.pin(link, name, "tracepoint", &target, None)
            }
            AttachKind::KProbe => self.kprobe(prog.try_into().map_err(wrong_type)?, name, attach),
            AttachKind::TpBtf
            | AttachKind::RawTracePoint
            | AttachKind::FEntry
            | AttachKind::FExit => {
                let target = kind.btf_target(attach).unwrap_or("");
                let words = match kind {
                    AttachKind::TpBtf => "to tp_btf/",
                    AttachKind::RawTracePoint => "to raw_tp/",
                    AttachKind::FEntry => "as fentry to ",
                    _ => "as fexit to ",
                };
                let what = format!("{words}{target}");
                let link = match kind {
                    AttachKind::TpBtf => {
                        fd_link!(prog, BtfTracePoint, name, &what, wrong_type, |p| p.attach())
                    }
                    AttachKind::RawTracePoint => {
                        fd_link!(prog, RawTracePoint, name, &what, wrong_type, |p| p
                            .attach(target))
                    }
                    AttachKind::FEntry => {
                        fd_link!(prog, FEntry, name, &what, wrong_type, |p| p.attach())
                    }
                    _ => fd_link!(prog, FExit, name, &what, wrong_type, |p| p.attach()),
                };
                self.pin(link, name, kind.field(), target, None)
            }
        }
    }

    /// Pins a new link in the attempt's directory and records it.
    fn pin(
        &mut self,
        link: FdLink,
        name: &str,
        kind: &str,
        target: &str,
        mode: Option<&str>,
    ) -> Result<(), Failure> {
        let record =
            pins::pin_link(link, self.dir, name, kind, target, mode).map_err(pin_failure)?;
        self.records.push(record);
        Ok(())
    }

    /// The previous version's first unused link that `matches`, marked used.
    fn take_previous(
        &mut self,
        matches: impl Fn(&LinkRecord) -> bool,
    ) -> Option<(LinkRecord, &'p Path)> {
        let p = self.previous?;
        let (i, l) = p
            .links
            .iter()
            .enumerate()
            .find(|(i, l)| !self.used[*i] && matches(l))?;
        self.used[i] = true;
        Some((l.clone(), p.dir))
    }

    fn kprobe(&mut self, kp: &mut KProbe, name: &str, attach: &Attach) -> Result<(), Failure> {
        let Some(target) = attach.kprobe.as_ref() else {
            return Ok(());
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
        self.pin(link, name, "kprobe", &target.function, None)
    }

    fn xdp(&mut self, xdp: &mut Xdp, name: &str, attach: &Attach) -> Result<(), Failure> {
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
            let id = match self.take_previous(|l| l.kind == "xdp" && l.target == *iface) {
                Some((old, old_dir)) if old.mode.as_deref() == Some(mode_name) => {
                    let (id, change) = switch_link(xdp, &old, old_dir).map_err(|e| fail(&*e))?;
                    self.changes.push(change);
                    id
                }
                Some((old, old_dir)) => {
                    // Native and generic XDP cannot be active together: break, then make.
                    let link_pin = old_dir.join(&old.pin);
                    std::fs::remove_file(&link_pin).map_err(|e| fail(&e))?;
                    self.changes.push(Change::Detached {
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
            self.pin(link, name, "xdp", iface, Some(mode_name))?;
        }
        Ok(())
    }

    fn tc(&mut self, tc: &mut SchedClassifier, name: &str, attach: &Attach) -> Result<(), Failure> {
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
            let old = self.take_previous(|l| {
                l.kind == "tc"
                    && l.netlink.is_none()
                    && l.target == *iface
                    && l.mode.as_deref() == Some(direction)
                    && l.program == name
            });
            let id = match old {
                Some((old, old_dir)) => {
                    let (id, change) = switch_link(tc, &old, old_dir).map_err(|e| fail(&*e))?;
                    self.changes.push(change);
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
                        let record =
                            attach_tc_netlink(tc, name, iface, attach_type, direction, &tcx)?;
                        self.records.push(record);
                        continue;
                    }
                },
            };
            let link = tc.take_link(id).map_err(|e| fail(&e))?;
            let link = FdLink::try_from(link).map_err(|e| fail(&e))?;
            self.pin(link, name, "tc", iface, Some(direction))?;
        }
        Ok(())
    }
}

/// The hooks whose links switch programs in place (BPF_LINK_UPDATE), XDP and TCX. They
/// differ only in these types and in how a pinned program is opened again.
trait SwitchableHook: Sized {
    type Link: TryFrom<FdLink, Error = LinkError>;
    type Id;
    /// Whether `Change::Replaced` records this hook as XDP.
    const XDP: bool;
    fn open_pinned(prog_pin: &Path) -> Result<Self, ProgramError>;
    fn switch(&mut self, link: Self::Link) -> Result<Self::Id, ProgramError>;
    /// Lets go of the link handle; the link stays attached and pinned.
    fn release(&mut self, id: Self::Id);
}

impl SwitchableHook for Xdp {
    type Link = XdpLink;
    type Id = XdpLinkId;
    const XDP: bool = true;
    fn open_pinned(prog_pin: &Path) -> Result<Self, ProgramError> {
        Xdp::from_pin(prog_pin, XdpAttachType::Interface)
    }
    fn switch(&mut self, link: XdpLink) -> Result<XdpLinkId, ProgramError> {
        self.attach_to_link(link)
    }
    fn release(&mut self, id: XdpLinkId) {
        let _ = self.take_link(id).map(FdLink::try_from);
    }
}

impl SwitchableHook for SchedClassifier {
    type Link = SchedClassifierLink;
    type Id = SchedClassifierLinkId;
    const XDP: bool = false;
    fn open_pinned(prog_pin: &Path) -> Result<Self, ProgramError> {
        SchedClassifier::from_pin(prog_pin)
    }
    fn switch(&mut self, link: SchedClassifierLink) -> Result<SchedClassifierLinkId, ProgramError> {
        self.attach_to_link(link)
    }
    fn release(&mut self, id: SchedClassifierLinkId) {
        let _ = self.take_link(id).map(FdLink::try_from);
    }
}

/// Switches the link pinned at `link_pin` to `program`, atomically.
fn switch_pinned<H: SwitchableHook>(
    program: &mut H,
    link_pin: &Path,
) -> Result<H::Id, Box<dyn std::error::Error>> {
    let pinned = PinnedLink::from_pin(link_pin)?;
    let link = H::Link::try_from(FdLink::from(pinned))?;
    Ok(program.switch(link)?)
}

/// Switches the previous version's link `old` to `program`; the change says how to undo it.
fn switch_link<H: SwitchableHook>(
    program: &mut H,
    old: &LinkRecord,
    old_dir: &Path,
) -> Result<(H::Id, Change), Box<dyn std::error::Error>> {
    let link_pin = old_dir.join(&old.pin);
    let id = switch_pinned(program, &link_pin)?;
    let change = Change::Replaced {
        xdp: H::XDP,
        link_pin,
        prog_pin: old_dir.join(pins::program_pin(&old.program)),
    };
    Ok((id, change))
}

/// Legacy tc: the clsact qdisc (made if missing) and a direct-action cls_bpf filter.
/// The filter is recorded by priority and handle and stays attached when the agent
/// lets go of it; `pins::remove_dir` detaches it.
pub(super) fn attach_tc_netlink(
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
            xdp,
            link_pin,
            prog_pin,
        } => {
            let restored = if *xdp {
                restore::<Xdp>(prog_pin, link_pin)
            } else {
                restore::<SchedClassifier>(prog_pin, link_pin)
            };
            restored.map_err(|e| {
                format!(
                    "restoring the {} link {}: {}",
                    if *xdp { "XDP" } else { "TCX" },
                    link_pin.display(),
                    chain(&*e)
                )
            })
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

/// Switches the link at `link_pin` back to the previous program pinned at `prog_pin`.
fn restore<H: SwitchableHook>(
    prog_pin: &Path,
    link_pin: &Path,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut old = H::open_pinned(prog_pin)?;
    let id = switch_pinned(&mut old, link_pin)?;
    // Still pinned at link_pin; dropping our handle keeps it attached.
    old.release(id);
    Ok(())
}
