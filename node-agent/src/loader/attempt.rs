//! One candidate variant, tried: its bytecode fetched and checked against the
//! assignment, loaded by its dispatch mechanism, and attached make-before-break. A
//! failure anywhere reverts what was switched and is the candidate's rejection.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use bpfpoly_crds::{
    program::{Bytecode, Dispatch, DispatchMechanism, Variant},
    state::{FallbackRecord, FallbackStage, ProgramAssignment},
};

use super::{
    attach,
    candidate::{self, Failure},
    mechanism,
    object::{self, ObjectInfo},
    LinkRecord, Loader, Mechanism,
};
use crate::fetch::{check_sha256, FetchError};

/// One candidate that made it, before it is recorded.
pub(super) struct Success {
    pub index: usize,
    /// Variant-level fallbacks of the candidates before it.
    pub earlier: Vec<FallbackRecord>,
    /// Time since the first candidate failed.
    pub since_first_failure: Option<Duration>,
    pub loaded: candidate::Loaded,
    pub links: Vec<LinkRecord>,
    pub changes: Vec<attach::Change>,
}

/// Config values parsed into the bytes written to `.rodata`.
pub(super) fn parse_config(a: &ProgramAssignment) -> Result<Vec<(String, Vec<u8>)>, String> {
    a.config
        .iter()
        .map(|c| {
            c.type_
                .parse_value(&c.value)
                .map(|v| (c.name.clone(), v.to_ne_bytes()))
                .map_err(|e| format!("config {:?}: {e}", c.name))
        })
        .collect()
}

/// How `variant` dispatches: the table when its programs include the entry, the
/// mechanism to use, and whether it was `auto`.
fn dispatch_plan<'a>(
    a: &'a ProgramAssignment,
    variant: &Variant,
    info: &ObjectInfo,
) -> (Option<&'a Dispatch>, Option<Mechanism>, bool) {
    let dispatch = a
        .dispatch
        .as_ref()
        .filter(|d| variant.programs.iter().any(|p| p.name == d.entry));
    let Some(d) = dispatch else {
        return (None, None, false);
    };
    let (mechanism, auto) = match variant.dispatch_mechanism.unwrap_or(d.mechanism) {
        DispatchMechanism::Auto => (
            object::check::resolve_auto(info, d, variant.handler_bytecode.is_some()),
            true,
        ),
        DispatchMechanism::TailCall => (Mechanism::TailCall, false),
        DispatchMechanism::Static => (Mechanism::Static, false),
        DispatchMechanism::Freplace => (Mechanism::Freplace, false),
    };
    (dispatch, Some(mechanism), auto)
}

/// The object against the variant, the config and the dispatch pieces, without the kernel.
fn check_object(
    info: &ObjectInfo,
    variant: &Variant,
    a: &ProgramAssignment,
    plan: (Option<&Dispatch>, Option<Mechanism>, bool),
) -> Result<(), Failure> {
    // With `auto`, freplace is a try: the object must at least fit what it falls back to.
    let checked = match plan {
        (Some(d), Some(Mechanism::Freplace), true) => {
            Some((d, object::check::resolve_auto(info, d, false)))
        }
        (Some(d), Some(m), _) => Some((d, m)),
        _ => None,
    };
    object::check::check_variant(info, variant, &a.config, checked).map_err(|problems| {
        Failure::new(
            FallbackStage::Verify,
            format!("object check: {}", problems.join("; ")),
        )
    })
}

impl Loader {
    /// Fetches, checks, loads and attaches candidate `index`.
    pub(super) fn try_candidate(
        &mut self,
        a: &ProgramAssignment,
        index: usize,
        config: &[(String, Vec<u8>)],
        dir: &Path,
        previous: Option<&(PathBuf, Vec<LinkRecord>)>,
        fetch: &dyn Fn(&Bytecode) -> Result<Vec<u8>, FetchError>,
    ) -> Result<Success, Failure> {
        let variant = &a.candidates[index];
        let bytes = self.fetch_checked(&variant.bytecode, fetch)?;
        let info = object::inspect(&bytes)
            .map_err(|e| Failure::new(FallbackStage::Verify, format!("bytecode: {e}")))?;
        let plan = dispatch_plan(a, variant, &info);
        check_object(&info, variant, a, plan)?;
        let (dispatch, mechanism, auto) = plan;
        let handler = match (&variant.handler_bytecode, mechanism) {
            (Some(source), Some(Mechanism::Freplace)) => Some(self.fetch_handler(source, fetch)),
            _ => None,
        };
        let input = candidate::Input {
            variant,
            object: &bytes,
            info: &info,
            config,
            dispatch: dispatch.zip(mechanism),
            auto,
            handler_object: handler.as_ref().map(|h| match h {
                Ok((b, i)) => Ok((b.as_slice(), i)),
                Err(e) => Err(e.clone()),
            }),
            policy: &a.fallback,
            dir,
        };
        let loaded = mechanism::load(&input, &mut self.kernel)?;
        let previous = previous.map(|(dir, links)| attach::Previous { dir, links });
        attach_loaded(loaded, variant, dir, previous.as_ref(), index)
    }

    /// The freplace handler object, fetched and inspected; Err is the reason it cannot be used.
    fn fetch_handler(
        &self,
        source: &Bytecode,
        fetch: &dyn Fn(&Bytecode) -> Result<Vec<u8>, FetchError>,
    ) -> Result<(Vec<u8>, ObjectInfo), String> {
        let bytes = self.fetch_checked(source, fetch).map_err(|f| f.reason)?;
        let info = object::inspect(&bytes).map_err(|e| e.to_string())?;
        Ok((bytes, info))
    }

    fn fetch_checked(
        &self,
        source: &Bytecode,
        fetch: &dyn Fn(&Bytecode) -> Result<Vec<u8>, FetchError>,
    ) -> Result<Vec<u8>, Failure> {
        let fail = |e: FetchError| Failure::new(FallbackStage::Verify, format!("bytecode: {e}"));
        let bytes = fetch(source).map_err(fail)?;
        if bytes.len() as u64 > self.cfg.max_object_bytes {
            return Err(fail(FetchError::TooLarge {
                what: "object".to_owned(),
                size: bytes.len() as u64,
                limit: self.cfg.max_object_bytes,
            }));
        }
        check_sha256(&bytes, source.sha256.as_deref()).map_err(fail)?;
        Ok(bytes)
    }
}

/// Attaches a loaded candidate; a failure reverts what was switched on the running version.
fn attach_loaded(
    mut loaded: candidate::Loaded,
    variant: &Variant,
    dir: &Path,
    previous: Option<&attach::Previous<'_>>,
    index: usize,
) -> Result<Success, Failure> {
    let mut changes = Vec::new();
    match attach::attach_variant(&mut loaded.ebpf, variant, dir, previous, &mut changes) {
        Ok(mut links) => {
            links.append(&mut loaded.extension_links);
            Ok(Success {
                index,
                earlier: Vec::new(),
                since_first_failure: None,
                loaded,
                links,
                changes,
            })
        }
        Err(mut failure) => {
            let errors = attach::revert(changes);
            if !errors.is_empty() {
                failure.reason = format!(
                    "{}; restoring the running version failed: {}",
                    failure.reason,
                    errors.join("; ")
                );
            }
            Err(failure)
        }
    }
}
