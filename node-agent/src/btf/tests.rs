//! Tests of the BTF reader: hostile input, hand-written BTF in both byte orders, and
//! agreement with the btf-rs crate on real kernels and the built-in objects.

use super::index::{check_header, hash_c_string, BTF_MAGIC};
use super::*;

#[path = "../../../test-support/xorshift.rs"]
mod xorshift;

fn vmlinux() -> Option<Vec<u8>> {
    std::fs::read(VMLINUX_BTF).ok()
}

#[test]
fn header_checks_name_the_problem() {
    assert!(check_header(b"").unwrap_err().contains("shorter"));
    assert!(
        check_header(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0")
            .unwrap_err()
            .contains("ELF")
    );
    assert!(check_header(&[0u8; 64]).unwrap_err().contains("magic"));
    let mut hdr = vec![0x9f, 0xeb, 1, 0];
    for w in [24u32, 0, 100, 100, 10] {
        hdr.extend_from_slice(&w.to_le_bytes());
    }
    assert!(check_header(&hdr).unwrap_err().contains("truncated"));
}

#[test]
fn empty_input_is_an_error() {
    let err = KernelBtf::from_bytes(b"", Path::new("/x")).unwrap_err();
    assert!(matches!(err, BtfError::Empty { .. }), "{err}");
}

/// Every prefix and many corruptions of real BTF (the built-in objects'
/// `.BTF`, whole and consistent) are errors or parse, never panics.
#[test]
fn truncated_and_corrupted_btf_never_panics() {
    use object::{Object as _, ObjectSection as _};
    let mut corpus = Vec::new();
    for name in crate::builtin::names() {
        let obj = object::File::parse(crate::builtin::builtin(name).unwrap()).unwrap();
        let btf = obj
            .section_by_name(".BTF")
            .unwrap()
            .data()
            .unwrap()
            .to_vec();
        assert!(KernelBtf::from_bytes(&btf, Path::new(name)).is_ok());
        corpus.push(btf);
    }
    let mut next = xorshift::xorshift(0x2545_f491_4f6c_dd1du64);
    for raw in &corpus {
        for cut in (0..raw.len()).step_by(13) {
            assert!(KernelBtf::from_bytes(&raw[..cut], Path::new("cut")).is_err());
        }
        for _ in 0..500 {
            let mut bytes = raw.clone();
            for _ in 0..(1 + next() % 6) {
                let at = (next() as usize) % bytes.len();
                bytes[at] = next() as u8;
            }
            if let Ok(btf) = KernelBtf::from_bytes(&bytes, Path::new("fuzz")) {
                // Queries on corrupt-but-parsable BTF must not panic either.
                for q in [
                    "type:struct bpfpoly_event",
                    "field:struct bpfpoly_event.pid",
                    "enum:enum bpf_map_type.BPF_MAP_TYPE_ARRAY",
                    "func:on_exec",
                ] {
                    let _ = btf.answer(&Query::parse(q).unwrap());
                }
            }
        }
    }
}

/// A small BTF written by hand, in either byte order.
struct Builder {
    types: Vec<u32>,
    strings: Vec<u8>,
    count: u32,
}

impl Builder {
    fn new() -> Builder {
        Builder {
            types: Vec::new(),
            strings: vec![0],
            count: 0,
        }
    }

    fn name(&mut self, s: &str) -> u32 {
        if s.is_empty() {
            return 0;
        }
        let off = self.strings.len() as u32;
        self.strings.extend_from_slice(s.as_bytes());
        self.strings.push(0);
        off
    }

    /// Appends a type; `trailing` are the words after the 12-byte record.
    fn ty(&mut self, name: &str, kind: u32, vlen: u32, size_or_type: u32, trailing: &[u32]) -> u32 {
        let name_off = self.name(name);
        self.types
            .extend([name_off, (kind << 24) | vlen, size_or_type]);
        self.types.extend_from_slice(trailing);
        self.count += 1;
        self.count
    }

    fn bytes(&self, little_endian: bool) -> Vec<u8> {
        let word = |w: u32| {
            if little_endian {
                w.to_le_bytes()
            } else {
                w.to_be_bytes()
            }
        };
        let type_len = self.types.len() as u32 * 4;
        let mut out = Vec::new();
        out.extend_from_slice(&if little_endian {
            BTF_MAGIC.to_le_bytes()
        } else {
            BTF_MAGIC.to_be_bytes()
        });
        out.extend_from_slice(&[1, 0]);
        for w in [24, 0, type_len, type_len, self.strings.len() as u32] {
            out.extend_from_slice(&word(w));
        }
        for w in &self.types {
            out.extend_from_slice(&word(*w));
        }
        out.extend_from_slice(&self.strings);
        out
    }
}

/// struct outer { int a; union { struct { int deep; }; }; const struct { int
/// in_inner; }; struct named { int hidden; } n; }; plus an enum, an enum64, a
/// forward declaration, a typedef and a function.
fn sample() -> Builder {
    let mut b = Builder::new();
    let int = b.ty("int", KIND_INT, 0, 4, &[32]);
    let deep = b.name("deep");
    let anon_struct = b.ty("", KIND_STRUCT, 1, 4, &[deep, int, 0]);
    let anon_union = b.ty("", KIND_UNION, 1, 4, &[0, anon_struct, 0]);
    let inner_field = b.name("in_inner");
    let inner = b.ty("", KIND_STRUCT, 1, 4, &[inner_field, int, 0]);
    let konst = b.ty("", KIND_CONST, 0, inner, &[]);
    let hidden = b.name("hidden");
    let named = b.ty("named", KIND_STRUCT, 1, 4, &[hidden, int, 0]);
    let (a, n) = (b.name("a"), b.name("n"));
    b.ty(
        "outer",
        KIND_STRUCT,
        4,
        16,
        &[a, int, 0, 0, anon_union, 32, 0, konst, 64, n, named, 96],
    );
    let (one, two) = (b.name("ONE"), b.name("TWO"));
    b.ty("numbers", KIND_ENUM, 2, 4, &[one, 1, two, 2]);
    let big = b.name("BIG");
    b.ty("wide", KIND_ENUM64, 1, 8, &[big, 0, 1]);
    b.ty("only_declared", KIND_FWD, 0, 0, &[]);
    b.ty("u32_t", KIND_TYPEDEF, 0, int, &[]);
    let proto = b.ty("", KIND_FUNC_PROTO, 0, int, &[]);
    b.ty("do_work", KIND_FUNC, 0, proto, &[]);
    b
}

/// The index hashes names in the string section as it finds their NUL; a query
/// hashes the name it is given: both must agree for every length and wherever
/// the string ends (mid-word, on a word boundary, at the end of the section).
#[test]
fn string_section_hashes_match_query_hashes() {
    for len in 0..40 {
        let name: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
        for pad in 0..10 {
            let mut section = vec![b'x'; pad];
            section.push(0);
            let start = section.len();
            section.extend_from_slice(&name);
            section.push(0);
            for tail in [0, 1, 7, 8, 9] {
                let mut s = section.clone();
                s.extend(std::iter::repeat_n(b'y', tail));
                assert_eq!(
                    hash_c_string(&s, start),
                    Some((name_hash(&name), len)),
                    "len {len}, pad {pad}, tail {tail}"
                );
            }
        }
        // No NUL: no string.
        assert_eq!(hash_c_string(&name, 0), None, "len {len}");
    }
    assert_ne!(name_hash(b"task_struct"), name_hash(b"task_struct\0"));
    assert_ne!(name_hash(b""), name_hash(b"\0"));
}

#[test]
fn answers_on_hand_written_btf_in_both_byte_orders() {
    let b = sample();
    for little_endian in [true, false] {
        let btf = KernelBtf::from_bytes(&b.bytes(little_endian), Path::new("s")).unwrap();
        let q = |s: &str| btf.answer(&Query::parse(s).unwrap());
        let order = if little_endian { "LE" } else { "BE" };
        assert_eq!(btf.type_count(), b.count, "{order}");
        assert_eq!(q("type:struct outer"), Some(true), "{order}");
        assert_eq!(q("type:union outer"), Some(false), "{order}");
        assert_eq!(q("field:struct outer.a"), Some(true), "{order}");
        // Through an anonymous union and an anonymous struct.
        assert_eq!(q("field:struct outer.deep"), Some(true), "{order}");
        // Through an anonymous const struct.
        assert_eq!(q("field:struct outer.in_inner"), Some(true), "{order}");
        // A named member's own members are not the struct's.
        assert_eq!(q("field:struct outer.hidden"), Some(false), "{order}");
        assert_eq!(q("field:struct outer.n"), Some(true), "{order}");
        assert_eq!(q("field:struct outer.nope"), Some(false), "{order}");
        assert_eq!(q("enum:enum numbers.TWO"), Some(true), "{order}");
        assert_eq!(q("enum:enum numbers.THREE"), Some(false), "{order}");
        assert_eq!(q("enum:enum wide.BIG"), Some(true), "{order}");
        assert_eq!(q("type:enum wide"), Some(true), "{order}");
        assert_eq!(q("type:struct only_declared"), Some(false), "{order}");
        assert_eq!(q("type:typedef u32_t"), Some(true), "{order}");
        assert_eq!(q("func:do_work"), Some(true), "{order}");
        assert_eq!(q("func:outer"), Some(false), "{order}");
        assert_eq!(btf.func_id("do_work"), Some(b.count), "{order}");
        assert_eq!(btf.func_id("u32_t"), None, "{order}");
    }
}

#[test]
fn record_and_string_errors_are_reported() {
    let good = sample().bytes(true);
    let parse = |bytes: &[u8]| KernelBtf::from_bytes(bytes, Path::new("x")).map(|_| ());
    assert!(parse(&good).is_ok());

    // Kind 31 in the first record.
    let mut bad = good.clone();
    bad[24 + 7] = 0x1f;
    let e = parse(&bad).unwrap_err().to_string();
    assert!(e.contains("unknown BTF kind 31"), "{e}");

    // A name offset in the middle of a string ("nt" of "int").
    let mut bad = good.clone();
    bad[24..28].copy_from_slice(&2u32.to_le_bytes());
    let e = parse(&bad).unwrap_err().to_string();
    assert!(e.contains("invalid name offset 2"), "{e}");

    // A struct whose members run past the type section.
    let mut b = Builder::new();
    b.ty("s", KIND_STRUCT, 5, 4, &[0, 0, 0]);
    let e = parse(&b.bytes(true)).unwrap_err().to_string();
    assert!(e.contains("runs past the end"), "{e}");

    // Version 2, flags, invalid UTF-8.
    let mut bad = good.clone();
    bad[2] = 2;
    assert!(parse(&bad).unwrap_err().to_string().contains("version 2"));
    let mut bad = good.clone();
    bad[3] = 1;
    assert!(parse(&bad).unwrap_err().to_string().contains("flags"));
    let mut bad = good.clone();
    let last = bad.len() - 2;
    bad[last] = 0xff;
    assert!(parse(&bad).unwrap_err().to_string().contains("UTF-8"));
}

/// A chain of 200,000 anonymous members, each inside the previous: answered
/// without recursion (a recursive search overflows the test thread's stack).
#[test]
fn deeply_nested_anonymous_members_do_not_exhaust_the_stack() {
    const DEPTH: u32 = 200_000;
    let mut b = Builder::new();
    let int = b.ty("int", KIND_INT, 0, 4, &[32]);
    let leaf = b.name("leaf");
    // Ids: int = 1, outer = 2, the chain 3..=DEPTH+2, the last one has `leaf`.
    b.ty("outer", KIND_STRUCT, 1, 4, &[0, 3, 0]);
    for i in 0..DEPTH {
        let id = 3 + i;
        if i + 1 == DEPTH {
            b.ty("", KIND_STRUCT, 1, 4, &[leaf, int, 0]);
        } else {
            b.ty("", KIND_STRUCT, 1, 4, &[0, id + 1, 0]);
        }
    }
    let btf = KernelBtf::from_bytes(&b.bytes(true), Path::new("deep")).unwrap();
    assert!(btf.has_field("struct", "outer", "leaf"));
    assert!(!btf.has_field("struct", "outer", "other"));
}

/// The same answers as btf-rs (the parser this module used before) for every
/// name of the given BTF: types of each kind, functions, every member of every
/// struct and union, every enumerator, and made-up names.
fn agrees_with_btf_rs(raw: &[u8], what: &str) -> usize {
    use btf_rs::{Btf, Type};
    let ours = KernelBtf::from_bytes(raw, Path::new(what)).unwrap();
    let theirs = Btf::from_bytes(raw).unwrap();
    let (_, last) = theirs.base().type_id_range();
    assert_eq!(ours.type_count(), last, "{what}: type count");
    let named = |id: u32| -> Option<(String, Type)> {
        let t = theirs.resolve_type_by_id(id).ok()?;
        let n = theirs.resolve_name(t.as_btf_type()?).ok()?;
        (!n.is_empty()).then_some((n, t))
    };
    let mut checked = 0;
    let mut funcs_seen = HashSet::new();
    for id in 1..=last {
        let Some((name, ty)) = named(id) else {
            continue;
        };
        let ids = theirs.resolve_ids_by_name(&name).unwrap();
        let kinds: Vec<Type> = ids
            .iter()
            .map(|i| theirs.resolve_type_by_id(*i).unwrap())
            .collect();
        let any = |f: &dyn Fn(&Type) -> bool| kinds.iter().any(f);
        for (kind, theirs_has) in [
            ("struct", any(&|t| matches!(t, Type::Struct(_)))),
            ("union", any(&|t| matches!(t, Type::Union(_)))),
            (
                "enum",
                any(&|t| matches!(t, Type::Enum(_) | Type::Enum64(_))),
            ),
            ("typedef", any(&|t| matches!(t, Type::Typedef(_)))),
        ] {
            assert_eq!(
                ours.has_type(kind, &name),
                theirs_has,
                "{what}: {kind} {name}"
            );
        }
        let theirs_func = any(&|t| matches!(t, Type::Func(_)));
        assert_eq!(ours.has_func(&name), theirs_func, "{what}: func {name}");
        if matches!(ty, Type::Func(_)) && funcs_seen.insert(name.clone()) {
            let first = ids
                .iter()
                .copied()
                .find(|i| matches!(theirs.resolve_type_by_id(*i), Ok(Type::Func(_))));
            assert_eq!(ours.func_id(&name), first, "{what}: func id of {name}");
        }
        checked += 5;
        match &ty {
            Type::Struct(s) | Type::Union(s) => {
                let kind = if matches!(ty, Type::Struct(_)) {
                    "struct"
                } else {
                    "union"
                };
                for m in &s.members {
                    if let Ok(f) = theirs.resolve_name(m) {
                        if !f.is_empty() {
                            assert!(ours.has_field(kind, &name, &f), "{what}: {kind} {name}.{f}");
                            checked += 1;
                        }
                    }
                }
                assert!(!ours.has_field(kind, &name, "bpfpoly_no_such_field"));
            }
            Type::Enum(e) => {
                for m in &e.members {
                    let v = theirs.resolve_name(m).unwrap();
                    assert!(ours.has_enum_value(&name, &v), "{what}: {name}.{v}");
                    checked += 1;
                }
            }
            Type::Enum64(e) => {
                for m in &e.members {
                    let v = theirs.resolve_name(m).unwrap();
                    assert!(ours.has_enum_value(&name, &v), "{what}: {name}.{v}");
                    checked += 1;
                }
            }
            _ => {}
        }
    }
    for made_up in ["bpfpoly_no_such_type", "", " ", "task_struct "] {
        for kind in ["struct", "union", "enum", "typedef"] {
            assert!(!ours.has_type(kind, made_up), "{what}: {kind} {made_up:?}");
        }
        assert!(!ours.has_func(made_up));
    }
    checked
}

#[test]
fn agrees_with_btf_rs_on_the_builtin_objects() {
    use object::{Object as _, ObjectSection as _};
    for name in crate::builtin::names() {
        let obj = object::File::parse(crate::builtin::builtin(name).unwrap()).unwrap();
        let btf = obj.section_by_name(".BTF").unwrap().data().unwrap();
        assert!(agrees_with_btf_rs(btf, name) > 0, "{name}: nothing checked");
    }
}

#[test]
fn agrees_with_btf_rs_on_this_kernel() {
    let raw = std::fs::read(VMLINUX_BTF).expect("this kernel's BTF (/sys/kernel/btf/vmlinux)");
    let checked = agrees_with_btf_rs(&raw, VMLINUX_BTF);
    assert!(checked > 300_000, "only {checked} answers compared");
}

/// Debian 12's 6.1 kernel BTF (`make deps` caches it; `cli_profile` needs it too).
#[test]
fn agrees_with_btf_rs_on_debian_61() {
    let cache = std::env::var_os("BPFPOLY_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/bpfpoly")
        });
    let path = cache.join("btf/debian-6.1-cloud.btf");
    let raw = match std::fs::read(&path) {
        Ok(raw) => raw,
        Err(e) if std::env::var("BPFPOLY_SKIP_PRIVILEGED").as_deref() == Ok("1") => {
            eprintln!(
                "skipped: {}: {e} and BPFPOLY_SKIP_PRIVILEGED=1",
                path.display()
            );
            return;
        }
        Err(e) => panic!(
            "{}: {e}: run `make deps` (e2e/env/fetch-btf.sh) to fetch the Debian 6.1 kernel's BTF",
            path.display()
        ),
    };
    let checked = agrees_with_btf_rs(&raw, "debian-6.1");
    assert!(checked > 200_000, "only {checked} answers compared");
}

#[test]
fn answers_on_this_kernel() {
    let Some(raw) = vmlinux() else { return };
    let btf = KernelBtf::from_bytes(&raw, Path::new(VMLINUX_BTF)).unwrap();
    let q = |s: &str| btf.answer(&Query::parse(s).unwrap());
    assert_eq!(q("type:struct task_struct"), Some(true));
    assert_eq!(q("type:union task_struct"), Some(false));
    assert_eq!(q("type:typedef u32"), Some(true));
    assert_eq!(q("type:enum bpf_func_id"), Some(true));
    assert_eq!(q("field:struct task_struct.loginuid"), Some(true));
    // `dev` sits in an anonymous union inside an anonymous struct inside an
    // anonymous union; `protocol` in the anonymous `headers` struct group.
    assert_eq!(q("field:struct sk_buff.dev"), Some(true));
    assert_eq!(q("field:struct sk_buff.protocol"), Some(true));
    assert_eq!(q("field:struct sk_buff.loginuid"), Some(false));
    assert_eq!(q("field:struct task_struct.no_such_field_x"), Some(false));
    assert_eq!(
        q("enum:enum bpf_func_id.BPF_FUNC_ringbuf_output"),
        Some(true)
    );
    assert_eq!(q("enum:enum bpf_func_id.BPF_FUNC_nope"), Some(false));
    // An ENUM64 on x86-64.
    assert_eq!(
        q("enum:enum perf_callchain_context.PERF_CONTEXT_USER"),
        Some(true)
    );
    assert_eq!(q("func:do_sys_openat2"), Some(true));
    assert_eq!(q("func:task_struct"), Some(false));
    assert_eq!(q("helper:xdp:bpf_redirect"), None);
}
