//! The eBPF objects shipped inside the agent (`bytecode.builtin` in a
//! `BpfPolyProgram` variant). build.rs runs the `ebpf/` build and embeds every
//! `ebpf/build/<name>.o` under `<name>`, e.g. `packet-classifier-xdp`,
//! `exec-tracer-tpbtf`. See ebpf/README.md for what each object contains.

// Until the agent uses both functions, and when tests include this file.
#![allow(dead_code)]

/// Embedded bytes with 8-byte alignment: the ELF parser reads the object in
/// place and needs its headers aligned, which `include_bytes!` alone does not
/// promise.
#[repr(C, align(8))]
struct Aligned<T: ?Sized>(T);

include!(concat!(env!("OUT_DIR"), "/builtin_catalog.rs"));

/// The object built from `ebpf/` whose file stem is `name`, if there is one.
pub fn builtin(name: &str) -> Option<&'static [u8]> {
    lookup(name)
}

/// The names of all built-in objects, sorted.
pub fn names() -> &'static [&'static str] {
    NAMES
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_resolves_to_an_aligned_elf_object() {
        assert!(!names().is_empty());
        for name in names() {
            let bytes = builtin(name).unwrap_or_else(|| panic!("{name} listed but missing"));
            assert_eq!(
                bytes.as_ptr() as usize % 8,
                0,
                "{name} is not 8-byte aligned"
            );
            assert_eq!(&bytes[..4], b"\x7fELF", "{name} is not an ELF object");
        }
    }

    #[test]
    fn unknown_names_are_none() {
        assert!(builtin("no-such-program").is_none());
        assert!(builtin("packet-classifier-xdp.o").is_none());
    }
}
