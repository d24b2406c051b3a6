//! The object checked against the CR before loading: programs, config globals and what
//! the dispatch mechanism needs; and which mechanism `auto` means for an object.

use bpfpoly_crds::{
    program::{ConfigType, Dispatch, Variant},
    state::ResolvedConfig,
};

use super::{
    c_type, compatible, slot_function, AttachKind, Mechanism, ObjectInfo, ProgramKind,
    DISPATCH_MODE_GLOBAL, HANDLER_MASK_GLOBAL, MAP_TYPE_PROG_ARRAY,
};

/// Checks the object of `variant` against the CR before loading: programs exist and
/// their sections fit their attachments, config globals exist with a compatible
/// type, and what the dispatch `mechanism` needs is there. Every problem is listed.
pub fn check_variant(
    info: &ObjectInfo,
    variant: &Variant,
    config: &[ResolvedConfig],
    dispatch: Option<(&Dispatch, Mechanism)>,
) -> Result<(), Vec<String>> {
    let mut problems = Vec::new();
    let program_list = || {
        let names: Vec<&str> = info.programs.keys().map(String::as_str).collect();
        if names.is_empty() {
            "none".to_owned()
        } else {
            names.join(", ")
        }
    };
    for program in &variant.programs {
        let Some(&kind) = info.programs.get(&program.name) else {
            problems.push(format!(
                "program {:?} not found in the object (it has: {})",
                program.name,
                program_list()
            ));
            continue;
        };
        if let Some(attach) = program.attach.as_ref().and_then(AttachKind::of) {
            if kind != attach.program_kind() {
                problems.push(format!(
                    "program {:?} attaches as {} and needs a {} section, but the object has it in a {} section",
                    program.name,
                    attach.field(),
                    attach.program_kind().section(),
                    kind.section()
                ));
            }
        }
    }
    for field in config {
        check_global(
            info,
            &field.name,
            field.type_,
            "config global",
            &mut problems,
        );
    }
    // The dispatch ABI globals are written with a fixed width.
    for (name, t) in [
        (DISPATCH_MODE_GLOBAL, ConfigType::U32),
        (HANDLER_MASK_GLOBAL, ConfigType::U64),
    ] {
        if info.globals.contains_key(name) {
            check_global(info, name, t, "dispatch global", &mut problems);
        }
    }
    if let Some((dispatch, mechanism)) = dispatch {
        check_dispatch(info, variant, dispatch, mechanism, &mut problems);
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

fn check_global(
    info: &ObjectInfo,
    name: &str,
    declared: ConfigType,
    what: &str,
    problems: &mut Vec<String>,
) {
    match info.globals.get(name) {
        None => {
            let names: Vec<&str> = info.globals.keys().map(String::as_str).collect();
            problems.push(format!(
                "{what} {name:?} not found in the object's .rodata/.data (it has: {})",
                if names.is_empty() {
                    "none".to_owned()
                } else {
                    names.join(", ")
                }
            ));
        }
        Some(global) if !compatible(declared, global) => problems.push(format!(
            "{what} {name:?} is declared {} but the object has {} ({} byte{}, in {})",
            c_type(declared),
            global.scalar,
            global.size,
            if global.size == 1 { "" } else { "s" },
            global.section
        )),
        Some(_) => {}
    }
}

fn check_dispatch(
    info: &ObjectInfo,
    variant: &Variant,
    dispatch: &Dispatch,
    mechanism: Mechanism,
    problems: &mut Vec<String>,
) {
    let entry_kind = info.programs.get(&dispatch.entry).copied();
    match mechanism {
        Mechanism::TailCall => {
            match info.maps.get(&dispatch.table) {
                None => problems.push(format!(
                    "dispatch table {:?} (PROG_ARRAY) not found in the object",
                    dispatch.table
                )),
                Some(t) if t != MAP_TYPE_PROG_ARRAY => problems.push(format!(
                    "dispatch table {:?} is a {t} map, not a {MAP_TYPE_PROG_ARRAY}",
                    dispatch.table
                )),
                Some(_) => {}
            }
            for slot in &dispatch.slots {
                if !variant.programs.iter().any(|p| p.name == slot.handler) {
                    continue; // reported as an empty slot, not a mismatch
                }
                match (info.programs.get(&slot.handler), entry_kind) {
                    (Some(&kind), Some(entry)) if kind != entry => problems.push(format!(
                        "handler {:?} (key {}) is in a {} section but tail calls need the entry's type ({})",
                        slot.handler,
                        slot.key,
                        kind.section(),
                        entry.section()
                    )),
                    _ => {}
                }
            }
        }
        Mechanism::Static => {
            for name in [DISPATCH_MODE_GLOBAL, HANDLER_MASK_GLOBAL] {
                if !info.globals.contains_key(name) {
                    problems.push(format!(
                        "static dispatch needs the global {name:?}, which the object lacks"
                    ));
                }
            }
        }
        Mechanism::Freplace => {
            if !info.globals.contains_key(DISPATCH_MODE_GLOBAL) {
                problems.push(format!(
                    "freplace dispatch needs the global {DISPATCH_MODE_GLOBAL:?}, which the object lacks"
                ));
            }
            for slot in &dispatch.slots {
                let func = slot_function(slot.key);
                if !info.functions.contains(&func) {
                    problems.push(format!(
                        "freplace dispatch needs the global function {func:?} (key {}) in the entry object",
                        slot.key
                    ));
                }
            }
        }
    }
}

/// Checks a freplace handler object: each slot's handler is a `freplace/` program.
pub fn check_handler_object(info: &ObjectInfo, dispatch: &Dispatch) -> Result<(), Vec<String>> {
    let problems: Vec<String> = dispatch
        .slots
        .iter()
        .filter_map(|slot| match info.programs.get(&slot.handler) {
            Some(ProgramKind::Extension) => None,
            Some(kind) => Some(format!(
                "handler {:?} is in a {} section of the handler object, not freplace/{}",
                slot.handler,
                kind.section(),
                slot_function(slot.key)
            )),
            None => Some(format!(
                "handler {:?} (key {}) not found in the handler object",
                slot.handler, slot.key
            )),
        })
        .collect();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// Which mechanism `auto` means for an object: freplace when a handler object is
/// given (the kernel decides whether it loads), else tail calls when the table is
/// there, else static dispatch when the object supports it.
pub fn resolve_auto(info: &ObjectInfo, dispatch: &Dispatch, has_handler_object: bool) -> Mechanism {
    if has_handler_object && info.globals.contains_key(DISPATCH_MODE_GLOBAL) {
        Mechanism::Freplace
    } else if info.maps.contains_key(&dispatch.table)
        || !info.globals.contains_key(HANDLER_MASK_GLOBAL)
    {
        Mechanism::TailCall
    } else {
        Mechanism::Static
    }
}
