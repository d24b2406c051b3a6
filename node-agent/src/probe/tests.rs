//! Tests of the feature probes against this kernel and of the name tables.

use super::*;
use aya_obj::generated::bpf_prog_type;
use bpfpoly_crds::helpers::HELPERS;

#[test]
fn program_type_names_match_kernel_numbers() {
    for (name, id) in PROGRAM_TYPES {
        let pt = program_type(name).unwrap_or_else(|| panic!("{name} unmapped"));
        assert_eq!(bpf_prog_type::from(pt) as u32, *id, "{name}");
    }
    assert!(program_type("nope").is_none());
}

#[test]
fn map_type_names_match_kernel_numbers() {
    for (name, id) in MAP_TYPES {
        let mt = map_type(name).unwrap_or_else(|| panic!("{name} unmapped"));
        assert_eq!(mt as u32, *id, "{name}");
    }
    assert!(map_type("nope").is_none());
}

#[test]
fn helper_ids_match_the_loader() {
    for (name, id) in HELPERS {
        if *id >= BpfHelper::__BPF_FUNC_MAX_ID as u32 {
            assert!(bpf_helper(name).is_none());
            continue;
        }
        let helper = bpf_helper(name).unwrap_or_else(|| panic!("{name} unmapped"));
        let expected = format!("BPF_FUNC_{}", name.trim_start_matches("bpf_"));
        assert_eq!(format!("{helper:?}"), expected);
        assert_eq!(helper as u32, *id);
    }
    assert!(bpf_helper("bpf_no_such_helper").is_none());
}

#[test]
fn local_storage_table_matches_the_api() {
    for (name, id) in LOCAL_STORAGE_MAPS {
        assert!(MAP_TYPES.contains(&(*name, *id)), "{name}");
    }
}

/// False (after saying so) when privileged tests are off: the probes load
/// programs and create maps.
fn privileged() -> bool {
    if std::env::var("BPFPOLY_SKIP_PRIVILEGED").as_deref() == Ok("1") {
        eprintln!("skipped: BPFPOLY_SKIP_PRIVILEGED=1 (the feature probes load eBPF)");
        return false;
    }
    true
}

/// The names `probe` says are supported, in order; inconclusive probes go to `notes`.
fn supported<'a>(
    names: impl Iterator<Item = &'a str>,
    notes: &mut Vec<String>,
    probe: impl Fn(&str) -> Result<bool, String>,
) -> Vec<String> {
    let mut out = Vec::new();
    for name in names {
        match probe(name) {
            Ok(true) => out.push(name.to_string()),
            Ok(false) => {}
            Err(note) => notes.push(note),
        }
    }
    out
}

/// The probes give what aya's own probes give on this kernel, type by type,
/// with the same notes; the tracing and lsm probes use the ids from this
/// module's BTF parse (the same ids aya's parse finds).
#[test]
fn probes_answer_as_aya_does() {
    if !privileged() {
        return;
    }
    let btf = KernelBtf::load(std::path::Path::new(VMLINUX_BTF)).unwrap();
    let targets = AttachTargets::from_btf(&btf);
    let aya_btf = aya_obj::btf::Btf::from_sys_fs().unwrap();
    let aya_id = |name| {
        aya_btf
            .id_by_type_name_kind(name, aya_obj::btf::BtfKind::Func)
            .unwrap_or(0)
    };
    assert_eq!(targets.fentry, aya_id(FENTRY_TARGET));
    assert_eq!(targets.lsm, aya_id(LSM_TARGET));

    let mut asked = 0;
    let probed = probe_features(|| {
        asked += 1;
        targets
    });
    assert_eq!(asked, 1, "the targets are asked for once");

    // Each type as aya probes it: supported, not, or inconclusive (a note).
    let mut notes = Vec::new();
    let programs = supported(PROGRAM_TYPES.iter().map(|(n, _)| *n), &mut notes, |name| {
        is_program_supported(program_type(name).unwrap()).map_err(|e| {
            format!(
                "program type {name}: probe inconclusive ({}); a real load decides",
                program_error(&e)
            )
        })
    });
    let maps = supported(MAP_TYPES.iter().map(|(n, _)| *n), &mut notes, |name| {
        is_map_supported(map_type(name).unwrap())
            .map_err(|e| format!("map type {name}: probe inconclusive ({})", e.io_error))
    });
    assert_eq!(probed.program_types, programs);
    assert_eq!(probed.map_types, maps);
    assert_eq!(probed.notes, notes);
}

#[test]
fn helpers_of_targetless_types_are_not_probed() {
    assert!(matches!(
        probe_helper("ext", "bpf_map_lookup_elem"),
        Err(ProbeError::NotProbeable(_))
    ));
    assert!(matches!(
        probe_helper("nope", "bpf_map_lookup_elem"),
        Err(ProbeError::UnknownProgramType(_))
    ));
}
