#![allow(clippy::unwrap_used)]

use super::system::{kernel_version, parse_config};
use super::*;

const CONFIG: &str = "\
#
# Automatically generated file; DO NOT EDIT.
CONFIG_CC_VERSION_TEXT=\"gcc (Debian 12.2.0-14) 12.2.0\"
CONFIG_HZ=250
CONFIG_BPF=y
CONFIG_BTRFS_FS=m
# CONFIG_KPROBES is not set
CONFIG_LOCALVERSION=\"\"
CONFIG_PHYSICAL_START=0x1000000
CONFIG_NEG=-5
CONFIG_EMPTY=
";

#[test]
fn config_files_parse_like_libbpf() {
    let c = parse_config(CONFIG, "test");
    assert_eq!(c.values["CONFIG_HZ"], "250");
    assert_eq!(c.values["CONFIG_BPF"], "y");
    assert_eq!(c.values["CONFIG_BTRFS_FS"], "m");
    assert_eq!(c.values["CONFIG_LOCALVERSION"], "\"\"");
    // "is not set" is absent, as in libbpf; so is an empty value.
    assert!(!c.values.contains_key("CONFIG_KPROBES"));
    assert!(!c.values.contains_key("CONFIG_EMPTY"));
    assert_eq!(c.values.len(), 7);
}

#[test]
fn releases_become_kernel_version_codes() {
    assert_eq!(kernel_version("6.1.0-18-amd64"), (6 << 16) | (1 << 8));
    assert_eq!(
        kernel_version("6.18.44-fc-v1147"),
        (6 << 16) | (18 << 8) | 44
    );
    // The patch level saturates at 255, as KERNEL_VERSION() does.
    assert_eq!(kernel_version("4.19.325"), (4 << 16) | (19 << 8) | 255);
    assert_eq!(kernel_version("6.1"), 0);
    assert_eq!(kernel_version("linux"), 0);
}

#[test]
fn numbers_parse_like_strtoull() {
    assert_eq!(parse_number("250"), Some(250));
    assert_eq!(parse_number("0x1000000"), Some(0x100_0000));
    assert_eq!(parse_number("010"), Some(8));
    assert_eq!(parse_number("0"), Some(0));
    assert_eq!(parse_number("-5"), Some(5u64.wrapping_neg()));
    assert_eq!(parse_number("12ab"), None);
}

#[test]
fn values_encode_by_kind() {
    let tri = Kind::Tristate { bytes: 4 };
    let u32k = Kind::Int {
        bytes: 4,
        signed: false,
    };
    let i32k = Kind::Int {
        bytes: 4,
        signed: true,
    };
    let u8k = Kind::Int {
        bytes: 1,
        signed: false,
    };
    let _ = u8k;
    assert_eq!(encode(&Kind::Bool, "y").unwrap(), vec![1]);
    assert_eq!(encode(&Kind::Bool, "n").unwrap(), vec![0]);
    assert!(encode(&Kind::Bool, "m").unwrap_err().contains("tristate"));
    assert_eq!(encode(&tri, "m").unwrap(), vec![2, 0, 0, 0]);
    assert_eq!(encode(&tri, "y").unwrap(), vec![1, 0, 0, 0]);
    assert_eq!(
        encode(&Kind::Char { signed: true }, "m").unwrap(),
        vec![b'm']
    );
    assert_eq!(encode(&u32k, "250").unwrap(), 250u32.to_le_bytes().to_vec());
    assert_eq!(encode(&i32k, "-5").unwrap(), (-5i32).to_le_bytes().to_vec());
    assert!(encode(&u32k, "-5").unwrap_err().contains("does not fit"));
    assert!(encode(&u32k, "0x100000000")
        .unwrap_err()
        .contains("does not fit"));
    assert!(encode(&u32k, "y")
        .unwrap_err()
        .contains("bool, tristate or char"));
    assert!(encode(&Kind::Bool, "250").unwrap_err().contains("integer"));
    let arr = Kind::CharArray { len: 6 };
    assert_eq!(encode(&arr, "\"ab\"").unwrap(), b"ab\0\0\0\0".to_vec());
    // Truncated to len - 1, NUL-terminated.
    assert_eq!(encode(&arr, "\"abcdefgh\"").unwrap(), b"abcde\0".to_vec());
    assert!(encode(&u32k, "\"ab\"").unwrap_err().contains("char array"));
}

fn ext(name: &str, kind: Kind, weak: bool) -> Extern {
    let size = match &kind {
        Kind::Bool | Kind::Char { .. } => 1,
        Kind::Tristate { bytes } | Kind::Int { bytes, .. } => *bytes,
        Kind::CharArray { len } => *len,
        Kind::Unsupported(_) => 0,
    };
    Extern {
        name: name.into(),
        section: KCONFIG_SECTION.into(),
        type_name: kind.describe(),
        weak,
        size,
        kind,
        symbol: 0,
        entry: 0,
    }
}

#[test]
fn missing_values_fail_strong_externs_and_zero_weak_ones() {
    let facts = KernelFacts::fixed("6.1.0-18-amd64", parse_config(CONFIG, "cfg"), true, false);
    let u32k = Kind::Int {
        bytes: 4,
        signed: false,
    };
    let externs = Externs {
        kconfig: vec![
            ext("LINUX_KERNEL_VERSION", u32k.clone(), false),
            ext("CONFIG_HZ", u32k.clone(), false),
            ext("CONFIG_KPROBES", Kind::Bool, true),
            ext("LINUX_HAS_BPF_COOKIE", Kind::Bool, false),
            ext("LINUX_HAS_SYSCALL_WRAPPER", Kind::Bool, false),
            ext("LINUX_SOMETHING_NEW", Kind::Bool, true),
        ],
        datasec: 1,
    };
    let v = values(&externs, &facts).unwrap();
    assert_eq!(v[0], 0x0006_0100u32.to_le_bytes().to_vec());
    assert_eq!(v[1], 250u32.to_le_bytes().to_vec());
    assert_eq!(v[2], vec![0]);
    assert_eq!(v[3], vec![1]);
    assert_eq!(v[4], vec![0]);
    assert_eq!(v[5], vec![0]);

    let strong = Externs {
        kconfig: vec![ext("CONFIG_KPROBES", Kind::Bool, false)],
        datasec: 1,
    };
    let err = values(&strong, &facts).unwrap_err();
    assert_eq!(err.len(), 1);
    assert!(err[0].starts_with("extern CONFIG_KPROBES:"), "{err:?}");
    assert!(err[0].contains("not set in cfg"), "{err:?}");
}

#[test]
fn names_and_types_libbpf_refuses_are_refused_offline() {
    let u32k = Kind::Int {
        bytes: 4,
        signed: false,
    };
    assert!(check_name_and_kind(&ext("CONFIG_X", Kind::Bool, false)).is_ok());
    assert!(check_name_and_kind(&ext("LINUX_FOO", Kind::Bool, true)).is_ok());
    let e = check_name_and_kind(&ext("LINUX_FOO", Kind::Bool, false)).unwrap_err();
    assert!(e.contains("LINUX_FOO"), "{e}");
    let e = check_name_and_kind(&ext("my_value", u32k.clone(), false)).unwrap_err();
    assert!(e.contains("my_value"), "{e}");
    let e = check_name_and_kind(&ext("LINUX_KERNEL_VERSION", Kind::Bool, false)).unwrap_err();
    assert!(e.contains("integer"), "{e}");
    let e = check_name_and_kind(&ext("LINUX_HAS_BPF_COOKIE", u32k, false)).unwrap_err();
    assert!(e.contains("bool"), "{e}");
    let e = check_name_and_kind(&ext(
        "CONFIG_S",
        Kind::Unsupported("struct s".into()),
        false,
    ))
    .unwrap_err();
    assert!(e.contains("CONFIG_S") && e.contains("struct s"), "{e}");
}

#[test]
fn layout_aligns_each_extern_naturally() {
    let externs = Externs {
        kconfig: vec![
            ext("CONFIG_A", Kind::Bool, false),
            ext(
                "CONFIG_B",
                Kind::Int {
                    bytes: 8,
                    signed: false,
                },
                false,
            ),
            ext("CONFIG_C", Kind::CharArray { len: 3 }, false),
            ext("CONFIG_D", Kind::Tristate { bytes: 4 }, false),
        ],
        datasec: 1,
    };
    let (places, size) = layout(&externs).expect("fits");
    assert_eq!(places, vec![(0, 1), (8, 8), (16, 3), (20, 4)]);
    assert_eq!(size, 24);
}
