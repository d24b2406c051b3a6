//! Dispatch by mechanism: filling the slots of a loaded entry with tail calls
//! (PROG_ARRAY), static dispatch (inlined handlers gated by `bpfpoly_handler_mask`,
//! reloaded with a rejected handler's bit cleared) or freplace (extensions of the
//! `bpfpoly_slot_<key>` functions). A rejected handler leaves its slot empty (its
//! keys take the default path) or rejects the variant, as the policy says.

use std::{collections::BTreeMap, error::Error as StdError, path::PathBuf};

use aya::{
    maps::ProgramArray,
    programs::{links::FdLink, Extension, ProgramFd},
    Ebpf,
};
use bpfpoly_crds::{
    program::{Attach, Dispatch, DispatchSlot, OnHandlerReject, Variant},
    state::{FallbackRecord, FallbackStage, HandlerState},
};

use super::{
    candidate::{
        load_attached, load_program, open_object, DispatchGlobals, Failure, Input, Kernel,
        LoadError, Loaded, EACCES,
    },
    error::chain,
    object::{self, Mechanism, ObjectInfo, ProgramKind},
    pins,
};

/// Static dispatch covers keys 0..=63 (bpfpoly.h).
const STATIC_MAX_KEY: u32 = 63;

/// The attach parameters of the entry (handlers of tracing types need its target).
fn entry_attach<'a>(variant: &'a Variant, dispatch: &Dispatch) -> Option<&'a Attach> {
    variant
        .programs
        .iter()
        .find(|p| p.name == dispatch.entry)
        .and_then(|p| p.attach.as_ref())
}

fn in_variant(variant: &Variant, handler: &str) -> bool {
    variant.programs.iter().any(|p| p.name == handler)
}

/// Records a rejected handler: an empty slot (default path), or the variant's end.
fn handler_rejected(
    input: &Input<'_>,
    key: u32,
    handler: &str,
    failure: Failure,
    handlers: &mut Vec<HandlerState>,
    fallbacks: &mut Vec<FallbackRecord>,
) -> Result<(), Failure> {
    if input.policy.on_handler_reject == OnHandlerReject::RejectVariant {
        return Err(Failure {
            stage: FallbackStage::Handler,
            reason: format!(
                "handler {handler:?} (key {key}) rejected and onHandlerReject is RejectVariant: {}",
                failure.reason
            ),
            verifier_log: failure.verifier_log,
        });
    }
    handlers.push(HandlerState {
        key,
        handler: handler.to_owned(),
        state: "Empty".to_owned(),
        reason: Some(failure.reason.clone()),
    });
    fallbacks.push(FallbackRecord {
        from: handler.to_owned(),
        to: "default-path".to_owned(),
        stage: FallbackStage::Handler,
        reason: format!("key {key}: {}", failure.reason),
        verifier_log: failure.verifier_log,
    });
    Ok(())
}

/// A slot whose handler is not a program of the variant is rejected as the policy says:
/// `Ok(true)` when its keys take the default path, `Err` when the variant is rejected.
/// `Ok(false)`: the handler is the variant's, to load.
fn reject_foreign(
    input: &Input<'_>,
    slot: &DispatchSlot,
    loaded: &mut Loaded,
) -> Result<bool, Failure> {
    if in_variant(input.variant, &slot.handler) {
        return Ok(false);
    }
    let f = not_in_variant(slot.key, &slot.handler, &input.variant.name);
    handler_rejected(
        input,
        slot.key,
        &slot.handler,
        f,
        &mut loaded.handlers,
        &mut loaded.fallbacks,
    )?;
    Ok(true)
}

fn slot_loaded(key: u32, handler: &str) -> HandlerState {
    HandlerState {
        key,
        handler: handler.to_owned(),
        state: "Loaded".to_owned(),
        reason: None,
    }
}

fn not_in_variant(key: u32, handler: &str, variant: &str) -> Failure {
    Failure::new(
        FallbackStage::Handler,
        format!("handler {handler:?} (key {key}) is not a program of variant {variant:?}"),
    )
}

pub(super) fn load_tail_call(
    input: &Input<'_>,
    dispatch: &Dispatch,
    kernel: &mut Kernel,
) -> Result<Loaded, Failure> {
    let mut loaded = load_attached(input, Some(Mechanism::TailCall.mode()), None, &[], kernel)?;
    loaded.mechanism = Some(Mechanism::TailCall);
    let attach = entry_attach(input.variant, dispatch);
    // A handler serving several keys is loaded once.
    let mut results: BTreeMap<String, Result<u32, Failure>> = BTreeMap::new();
    let mut fill = Vec::new();
    for slot in &dispatch.slots {
        if reject_foreign(input, slot, &mut loaded)? {
            continue;
        }
        let result = match results.get(&slot.handler) {
            Some(r) => r.clone(),
            None => {
                let r = if let Some(&id) = loaded.program_ids.get(&slot.handler) {
                    Ok(id)
                } else {
                    load_program(&mut loaded.ebpf, &slot.handler, attach, kernel).map_err(|e| {
                        e.failure(
                            FallbackStage::Handler,
                            &format!("handler {:?}", slot.handler),
                        )
                    })
                };
                results.insert(slot.handler.clone(), r.clone());
                r
            }
        };
        match result {
            Ok(id) => {
                loaded.program_ids.insert(slot.handler.clone(), id);
                loaded.handlers.push(slot_loaded(slot.key, &slot.handler));
                fill.push((slot.key, slot.handler.clone()));
            }
            Err(f) => handler_rejected(
                input,
                slot.key,
                &slot.handler,
                f,
                &mut loaded.handlers,
                &mut loaded.fallbacks,
            )?,
        }
    }
    // The table is pinned before it is filled: the kernel empties a PROG_ARRAY when its
    // last user reference goes, and the pin is the reference that outlives the agent.
    let table_err = |e: &dyn StdError| {
        Failure::new(
            FallbackStage::Attach,
            format!("dispatch table {:?}: {}", dispatch.table, chain(e)),
        )
    };
    let map = loaded.ebpf.take_map(&dispatch.table).ok_or_else(|| {
        Failure::new(
            FallbackStage::Verify,
            format!("dispatch table {:?} not in the object", dispatch.table),
        )
    })?;
    map.pin(input.dir.join(pins::TABLE_PIN))
        .map_err(|e| table_err(&e))?;
    let mut table = ProgramArray::try_from(map).map_err(|e| table_err(&e))?;
    for (key, handler) in fill {
        let program = loaded.ebpf.program(&handler).ok_or_else(|| {
            Failure::new(
                FallbackStage::Handler,
                format!("handler {handler:?} vanished"),
            )
        })?;
        let fd = program.fd().map_err(|e| table_err(&e))?;
        table.set(key, fd, 0).map_err(|e| table_err(&e))?;
    }
    Ok(loaded)
}

/// Static dispatch: the handlers are inlined into the entry behind mask bits. A
/// rejected handler is found (by verifying the handler programs on their own when the
/// object has them, else by adding bits one at a time) and its bit cleared.
pub(super) fn load_static(
    input: &Input<'_>,
    dispatch: &Dispatch,
    kernel: &mut Kernel,
) -> Result<Loaded, Failure> {
    let mut handlers = Vec::new();
    let mut fallbacks = Vec::new();
    let wanted = static_slots(input, dispatch, &mut handlers, &mut fallbacks)?;
    let full = mask_of(wanted.keys());
    let mut rejected: BTreeMap<u32, Failure> = BTreeMap::new();
    let loaded = match load_attached(input, STATIC_MODE, Some(full), &[], kernel) {
        Ok(loaded) => loaded,
        Err(first) => load_static_degraded(input, dispatch, kernel, &wanted, first, &mut rejected)?,
    };
    for (&key, handler) in &wanted {
        match rejected.remove(&key) {
            Some(f) => handler_rejected(input, key, handler, f, &mut handlers, &mut fallbacks)?,
            None => handlers.push(slot_loaded(key, handler)),
        }
    }
    handlers.sort_by_key(|h| h.key);
    Ok(Loaded {
        mechanism: Some(Mechanism::Static),
        handlers,
        fallbacks,
        ..loaded
    })
}

const STATIC_MODE: Option<u32> = Some(Mechanism::Static.mode());

/// The mask bits of `keys`.
fn mask_of<'k>(keys: impl Iterator<Item = &'k u32>) -> u64 {
    keys.fold(0u64, |m, k| m | (1u64 << k))
}

/// The slots static dispatch can serve, key -> handler; the others are rejected here
/// (not in the variant, or a key above `STATIC_MAX_KEY`).
fn static_slots(
    input: &Input<'_>,
    dispatch: &Dispatch,
    handlers: &mut Vec<HandlerState>,
    fallbacks: &mut Vec<FallbackRecord>,
) -> Result<BTreeMap<u32, String>, Failure> {
    let mut wanted = BTreeMap::new();
    for slot in &dispatch.slots {
        if !in_variant(input.variant, &slot.handler) {
            let f = not_in_variant(slot.key, &slot.handler, &input.variant.name);
            handler_rejected(input, slot.key, &slot.handler, f, handlers, fallbacks)?;
        } else if slot.key > STATIC_MAX_KEY {
            let f = Failure::new(
                FallbackStage::Handler,
                format!("static dispatch serves keys 0..={STATIC_MAX_KEY} only"),
            );
            handler_rejected(input, slot.key, &slot.handler, f, handlers, fallbacks)?;
        } else {
            wanted.insert(slot.key, slot.handler.clone());
        }
    }
    Ok(wanted)
}

/// The entry with every handler inlined was refused (`first`): find the handlers to
/// blame, into `rejected`, and load the entry without them.
fn load_static_degraded(
    input: &Input<'_>,
    dispatch: &Dispatch,
    kernel: &mut Kernel,
    wanted: &BTreeMap<u32, String>,
    first: Failure,
    rejected: &mut BTreeMap<u32, Failure>,
) -> Result<Loaded, Failure> {
    verify_handlers_alone(input, dispatch, kernel, wanted, rejected)?;
    let full = mask_of(wanted.keys());
    let retry = if rejected.is_empty() {
        Err(first)
    } else {
        let mask = full & !mask_of(rejected.keys());
        load_attached(input, STATIC_MODE, Some(mask), &[], kernel)
    };
    match retry {
        Ok(loaded) => Ok(loaded),
        Err(_) => {
            rejected.clear();
            load_static_incrementally(input, kernel, wanted, rejected)
        }
    }
}

/// Verifies the handler programs on their own (in the object opened with every wanted bit
/// set), where the object has them as programs of the entry's kind; the ones refused go
/// into `rejected`.
fn verify_handlers_alone(
    input: &Input<'_>,
    dispatch: &Dispatch,
    kernel: &mut Kernel,
    wanted: &BTreeMap<u32, String>,
    rejected: &mut BTreeMap<u32, Failure>,
) -> Result<(), Failure> {
    let full = mask_of(wanted.keys());
    let entry_kind = input.info.programs.get(&dispatch.entry).copied();
    let mut probe = open_object(
        kernel,
        (input.object, input.info),
        input.config,
        DispatchGlobals {
            mode: STATIC_MODE,
            mask: Some(full),
        },
        &[],
        &[],
    )?;
    let attach = entry_attach(input.variant, dispatch);
    for (&key, handler) in wanted {
        if input.info.programs.get(handler).copied() != entry_kind
            || entry_kind == Some(ProgramKind::Other)
        {
            continue;
        }
        if let Err(e) = load_program(&mut probe, handler, attach, kernel) {
            rejected.insert(
                key,
                e.failure(FallbackStage::Handler, &format!("handler {handler:?}")),
            );
        }
    }
    Ok(())
}

/// The entry alone, then one handler bit at a time: each bit the verifier refuses goes
/// into `rejected`, and the last accepted load is the one kept.
fn load_static_incrementally(
    input: &Input<'_>,
    kernel: &mut Kernel,
    wanted: &BTreeMap<u32, String>,
    rejected: &mut BTreeMap<u32, Failure>,
) -> Result<Loaded, Failure> {
    let mut best =
        load_attached(input, STATIC_MODE, Some(0), &[], kernel).map_err(|f| Failure {
            reason: format!("{} (with every handler masked off)", f.reason),
            ..f
        })?;
    let mut accepted = 0u64;
    for (&key, handler) in wanted {
        match load_attached(input, STATIC_MODE, Some(accepted | (1 << key)), &[], kernel) {
            Ok(l) => {
                accepted |= 1 << key;
                best = l;
            }
            Err(f) => {
                rejected.insert(
                    key,
                    Failure {
                        stage: FallbackStage::Handler,
                        reason: format!("the entry with handler {handler:?} inlined: {}", f.reason),
                        verifier_log: f.verifier_log,
                    },
                );
            }
        }
    }
    Ok(best)
}

/// Why freplace dispatch did not happen.
pub(super) enum Freplace {
    /// The mechanism is unavailable (no trampolines, missing pieces): try another.
    Mechanism(Failure),
    /// The variant itself is rejected (entry, or a handler under RejectVariant).
    Variant(Failure),
}

/// freplace dispatch: the entry with `bpfpoly_dispatch_mode = 2` and the maps it shares
/// with the handler object pinned, then each handler loaded as an extension of
/// `bpfpoly_slot_<key>` and attached.
pub(super) fn load_freplace(
    input: &Input<'_>,
    dispatch: &Dispatch,
    kernel: &mut Kernel,
) -> Result<Loaded, Freplace> {
    let (handler_bytes, handler_info) = freplace_handler_object(input, dispatch)?;
    let shared: Vec<(String, PathBuf)> = input
        .info
        .maps
        .keys()
        .filter(|m| handler_info.maps.contains_key(*m))
        .map(|m| (m.clone(), input.dir.join(pins::shared_map_pin(m))))
        .collect();
    let mut loaded = load_attached(
        input,
        Some(Mechanism::Freplace.mode()),
        None,
        &shared,
        kernel,
    )
    .map_err(Freplace::Variant)?;
    loaded.mechanism = Some(Mechanism::Freplace);
    let target = entry_fd(&loaded, dispatch)?;
    let extensions: Vec<String> = dispatch.slots.iter().map(|s| s.handler.clone()).collect();
    let mut handlers_ebpf = open_object(
        kernel,
        (handler_bytes, handler_info),
        input.config,
        DispatchGlobals {
            mode: None,
            mask: None,
        },
        &shared,
        &extensions,
    )
    .map_err(|f| {
        Freplace::Mechanism(Failure {
            stage: FallbackStage::Handler,
            ..f
        })
    })?;
    for slot in &dispatch.slots {
        if reject_foreign(input, slot, &mut loaded).map_err(Freplace::Variant)? {
            continue;
        }
        replace_slot(input, slot, &target, &mut handlers_ebpf, &mut loaded)?;
    }
    loaded.extra.push(handlers_ebpf);
    Ok(loaded)
}

fn mechanism_failure(reason: String) -> Freplace {
    Freplace::Mechanism(Failure::new(FallbackStage::Handler, reason))
}

/// The variant's handler object, checked against the dispatch table, and the entry
/// object's slot functions: what freplace needs before anything is loaded.
fn freplace_handler_object<'a>(
    input: &Input<'a>,
    dispatch: &Dispatch,
) -> Result<(&'a [u8], &'a ObjectInfo), Freplace> {
    let (handler_bytes, handler_info) = match &input.handler_object {
        None => {
            return Err(mechanism_failure(
                "the variant has no handlerBytecode".to_owned(),
            ))
        }
        Some(Err(e)) => return Err(mechanism_failure(format!("handler bytecode: {e}"))),
        Some(Ok(pair)) => *pair,
    };
    if let Err(problems) = object::check::check_handler_object(handler_info, dispatch) {
        return Err(mechanism_failure(format!(
            "handler object: {}",
            problems.join("; ")
        )));
    }
    let missing: Vec<String> = dispatch
        .slots
        .iter()
        .map(|s| object::slot_function(s.key))
        .filter(|f| !input.info.functions.contains(f))
        .collect();
    if !missing.is_empty() {
        return Err(mechanism_failure(format!(
            "the entry object lacks the slot functions {}",
            missing.join(", ")
        )));
    }
    Ok((handler_bytes, handler_info))
}

/// A descriptor of the loaded entry, the target the extensions replace functions of.
fn entry_fd(loaded: &Loaded, dispatch: &Dispatch) -> Result<ProgramFd, Freplace> {
    loaded
        .ebpf
        .program(&dispatch.entry)
        .ok_or_else(|| {
            mechanism_failure(format!(
                "entry {:?} is not an attached program",
                dispatch.entry
            ))
        })?
        .fd()
        .map_err(|e| mechanism_failure(format!("entry {:?}: {}", dispatch.entry, chain(&e))))?
        .try_clone()
        .map_err(|e| mechanism_failure(format!("entry fd: {}", chain(&e))))
}

/// Loads one slot's handler as an extension of `bpfpoly_slot_<key>`, attaches and pins
/// it. A handler the verifier refuses takes the policy's path; any other failure is the
/// mechanism's.
fn replace_slot(
    input: &Input<'_>,
    slot: &DispatchSlot,
    target: &ProgramFd,
    handlers_ebpf: &mut Ebpf,
    loaded: &mut Loaded,
) -> Result<(), Freplace> {
    let mech = mechanism_failure;
    let func = object::slot_function(slot.key);
    let what = format!("freplace of {func} by {:?}", slot.handler);
    let ext: &mut Extension = handlers_ebpf
        .program_mut(&slot.handler)
        .and_then(|p| p.try_into().ok())
        .ok_or_else(|| mech(format!("{what}: not an extension program")))?;
    let fd = target
        .try_clone()
        .map_err(|e| mech(format!("entry fd: {}", chain(&e))))?;
    if let Err(e) = ext.load(fd, &func) {
        let e = LoadError::from_program(e);
        if e.errno == Some(EACCES) && !e.log.trim().is_empty() {
            // The verifier looked at it and said no: this handler, not the mechanism.
            let f = e.failure(FallbackStage::Handler, &what);
            return handler_rejected(
                input,
                slot.key,
                &slot.handler,
                f,
                &mut loaded.handlers,
                &mut loaded.fallbacks,
            )
            .map_err(Freplace::Variant);
        }
        return Err(Freplace::Mechanism(
            e.failure(FallbackStage::Handler, &what),
        ));
    }
    let id = ext
        .info()
        .map(|i| i.id())
        .map_err(|e| mech(format!("{what}: {}", chain(&e))))?;
    let link_id = ext
        .attach()
        .map_err(|e| mech(format!("{what}: attaching: {}", chain(&e))))?;
    let link: FdLink = ext
        .take_link(link_id)
        .map_err(|e| mech(format!("{what}: {}", chain(&e))))?
        .into();
    let record =
        pins::pin_link(link, input.dir, &slot.handler, "freplace", &func, None).map_err(mech)?;
    ext.pin(input.dir.join(pins::program_pin(&slot.handler)))
        .map_err(|e| mech(format!("{what}: pinning: {}", chain(&e))))?;
    loaded.extension_links.push(record);
    loaded.program_ids.insert(slot.handler.clone(), id);
    loaded.handlers.push(slot_loaded(slot.key, &slot.handler));
    Ok(())
}
