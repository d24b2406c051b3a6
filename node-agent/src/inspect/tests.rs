//! Inspection of the built-in objects and of corrupted ones.

use super::*;

#[path = "../../../test-support/xorshift.rs"]
mod xorshift;

#[test]
fn non_objects_are_refused_with_the_reason() {
    assert!(matches!(inspect_bytes(b""), Err(InspectError::Empty)));
    assert!(matches!(
        inspect_bytes(b"#!/bin/sh\n"),
        Err(InspectError::NotElf)
    ));
    assert!(matches!(
        inspect_bytes(b"\x7fELF\x02\x01"),
        Err(InspectError::Malformed(_))
    ));
    if let Ok(bytes) = std::fs::read("/bin/true") {
        let err = inspect_bytes(&bytes).unwrap_err();
        assert!(matches!(err, InspectError::NotBpf(_)), "{err}");
        assert!(err.to_string().contains("X86_64"), "{err}");
    }
}

#[test]
fn misaligned_input_is_copied_not_refused() {
    let obj = crate::builtin::builtin("packet-classifier-xdp").unwrap();
    let mut shifted = vec![0u8; obj.len() + 1];
    shifted[1..].copy_from_slice(obj);
    let a = inspect_bytes(obj).unwrap();
    let b = inspect_bytes(&shifted[1..]).unwrap();
    assert_eq!(a, b);
}

/// Random byte corruption and truncation of real objects (the built-ins, and
/// libxdp's when installed): errors, never panics. `BPFPOLY_FUZZ_ITERS`
/// raises the number of corruptions per object (default 300).
#[test]
fn corrupted_objects_never_panic() {
    let iters: usize = std::env::var("BPFPOLY_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let mut corpus: Vec<Vec<u8>> = crate::builtin::names()
        .iter()
        .map(|n| crate::builtin::builtin(n).unwrap().to_vec())
        .collect();
    if let Ok(dir) = std::fs::read_dir("/usr/lib/x86_64-linux-gnu/bpf") {
        for entry in dir.flatten() {
            if entry.path().extension().is_some_and(|e| e == "o") {
                corpus.push(std::fs::read(entry.path()).unwrap());
            }
        }
    }
    let mut next = xorshift::xorshift(0x9e37_79b9_7f4a_7c15u64);
    for original in &corpus {
        assert!(inspect_bytes(original).is_ok());
        // Aim most corruptions at what the parsers read (ELF headers,
        // symbols, BTF, programs, maps), not at DWARF.
        use object::Object as _;
        let elf = object::File::parse(original.as_slice()).unwrap();
        let mut targets: Vec<(usize, usize)> = vec![(0, 64)];
        for section in elf.sections() {
            let name = section.name().unwrap_or("");
            if name.starts_with(".debug") || name.starts_with(".rel.debug") {
                continue;
            }
            if let Some((start, len)) = section.file_range() {
                if len > 0 {
                    targets.push((start as usize, len as usize));
                }
            }
        }
        for _ in 0..iters {
            let mut bytes = original.clone();
            for _ in 0..(1 + next() % 8) {
                let (start, len) = targets[(next() as usize) % targets.len()];
                let at = (start + (next() as usize) % len).min(bytes.len() - 1);
                bytes[at] = match next() % 4 {
                    0 => 0,
                    1 => 0xff,
                    _ => next() as u8,
                };
            }
            let _ = inspect_bytes(&bytes);
        }
        for cut in (0..original.len()).step_by(97) {
            let _ = inspect_bytes(&original[..cut]);
        }
    }
}
