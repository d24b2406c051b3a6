//! Loading one candidate by its dispatch mechanism: no dispatch, tail calls, static, or
//! freplace with its fallback to the others under `auto`. The primitives (opening the
//! object, loading programs, failures) are in `candidate`; the mechanisms in `dispatch`.

use std::{error::Error as StdError, path::Path};

use bpfpoly_crds::state::{FallbackRecord, FallbackStage};

use super::{
    candidate::{load_attached, Failure, Input, Kernel, Loaded},
    dispatch,
    error::chain,
    object::{Mechanism, DISPATCH_COUNTERS_MAP, HANDLER_MASK_GLOBAL},
    pins,
};

/// Loads the candidate by its mechanism; `Err` means the variant is rejected.
pub(super) fn load(input: &Input<'_>, kernel: &mut Kernel) -> Result<Loaded, Failure> {
    let Some((dispatch, mechanism)) = input.dispatch else {
        let mut loaded = load_attached(input, None, None, &[], kernel)?;
        pin_common(&mut loaded, input.dir)?;
        return Ok(loaded);
    };
    let mut loaded = match mechanism {
        Mechanism::TailCall => dispatch::load_tail_call(input, dispatch, kernel)?,
        Mechanism::Static => dispatch::load_static(input, dispatch, kernel)?,
        Mechanism::Freplace => match dispatch::load_freplace(input, dispatch, kernel) {
            Ok(loaded) => loaded,
            Err(dispatch::Freplace::Variant(f)) => return Err(f),
            Err(dispatch::Freplace::Mechanism(f)) if !input.auto => return Err(f),
            Err(dispatch::Freplace::Mechanism(f)) => {
                pins::empty_dir(input.dir).map_err(|e| Failure::new(FallbackStage::Attach, e))?;
                let instead = if input.info.maps.contains_key(&dispatch.table)
                    || !input.info.globals.contains_key(HANDLER_MASK_GLOBAL)
                {
                    Mechanism::TailCall
                } else {
                    Mechanism::Static
                };
                let mut loaded = match instead {
                    Mechanism::Static => dispatch::load_static(input, dispatch, kernel)?,
                    _ => dispatch::load_tail_call(input, dispatch, kernel)?,
                };
                let v = &input.variant.name;
                loaded.fallbacks.insert(
                    0,
                    FallbackRecord {
                        from: format!("{v}/freplace"),
                        to: format!("{v}/{}", instead.as_str()),
                        stage: f.stage,
                        reason: f.reason,
                        verifier_log: f.verifier_log,
                    },
                );
                loaded
            }
        },
    };
    loaded.dispatch_keys = dispatch.slots.iter().map(|s| s.key).collect();
    pin_common(&mut loaded, input.dir)?;
    Ok(loaded)
}

/// Pins every loaded program and the dispatch counters.
fn pin_common(loaded: &mut Loaded, dir: &Path) -> Result<(), Failure> {
    let pin_err = |what: &str, e: &dyn StdError| {
        Failure::new(
            FallbackStage::Attach,
            format!("pinning {what}: {}", chain(e)),
        )
    };
    let names: Vec<String> = loaded.program_ids.keys().cloned().collect();
    for name in names {
        if let Some(program) = loaded.ebpf.program_mut(&name) {
            if program.fd().is_ok() {
                program
                    .pin(dir.join(pins::program_pin(&name)))
                    .map_err(|e| pin_err(&format!("program {name:?}"), &e))?;
            }
        }
    }
    // The object's other maps are pinned too, for readers (stats, event buffers);
    // maps shared with a freplace handler object are pinned already.
    for (name, map) in loaded.ebpf.maps() {
        let path = if name == DISPATCH_COUNTERS_MAP {
            dir.join(pins::DISPATCH_PIN)
        } else if name.starts_with('.') {
            continue;
        } else {
            dir.join(pins::shared_map_pin(name))
        };
        if !path.exists() {
            map.pin(&path)
                .map_err(|e| pin_err(&format!("map {name:?}"), &e))?;
        }
    }
    Ok(())
}
