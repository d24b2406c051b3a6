//! The model of an object's `__kconfig` externs: what each holds, where it goes in the
//! resolved section, and the names of the sections involved.

use serde::Serialize;

/// The DATASEC of `__kconfig` externs.
pub const KCONFIG_SECTION: &str = ".kconfig";
/// The data section the externs become (aya makes `.rodata*` a read-only map).
pub const RESOLVED_SECTION: &str = ".rodata.kconfig";

/// What a `__kconfig` extern holds, by its BTF type (libbpf's `kcfg_type`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `bool` (`_Bool`): `y` or `n`.
    Bool,
    /// A one-byte integer (`char`, `u8`): `y`/`n`/`m` as characters, or a number.
    Char {
        /// Signed encoding.
        signed: bool,
    },
    /// `enum libbpf_tristate`: `n` 0, `y` 1, `m` 2.
    Tristate {
        /// Size in bytes (4, or 8 for an ENUM64).
        bytes: u32,
    },
    /// An integer of 2, 4 or 8 bytes.
    Int {
        /// Size in bytes.
        bytes: u32,
        /// Signed encoding.
        signed: bool,
    },
    /// `char NAME[len]`: a string value, NUL-terminated, truncated to `len - 1`.
    CharArray {
        /// Array length.
        len: u32,
    },
    /// Anything else (libbpf refuses it too), with what it is.
    Unsupported(String),
}

impl Kind {
    /// The spelling in messages and `inspect`.
    pub fn describe(&self) -> String {
        match self {
            Kind::Bool => "bool".into(),
            Kind::Char { signed } => if *signed { "i8" } else { "u8" }.into(),
            Kind::Tristate { .. } => "tristate".into(),
            Kind::Int { bytes, signed } => {
                format!("{}{}", if *signed { "i" } else { "u" }, bytes * 8)
            }
            Kind::CharArray { len } => format!("char[{len}]"),
            Kind::Unsupported(what) => what.clone(),
        }
    }

    fn align(&self) -> u32 {
        match self {
            Kind::Tristate { bytes } | Kind::Int { bytes, .. } => *bytes,
            _ => 1,
        }
    }
}

/// One `__kconfig` extern.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Extern {
    /// Its name (`CONFIG_HZ`, `LINUX_KERNEL_VERSION`).
    pub name: String,
    /// Its BTF DATASEC (`.kconfig`).
    pub section: String,
    /// `bool`, `tristate`, `u32`, `char[64]`...
    #[serde(rename = "type")]
    pub type_name: String,
    /// `__weak`: zero when the value is unknown.
    pub weak: bool,
    /// Size in bytes.
    pub size: u32,
    #[serde(skip)]
    pub(super) kind: Kind,
    /// ELF symbol index.
    #[serde(skip)]
    pub(super) symbol: usize,
    /// Index of its entry in the DATASEC.
    #[serde(skip)]
    pub(super) entry: usize,
}

impl Extern {
    /// What it holds.
    pub fn kind(&self) -> &Kind {
        &self.kind
    }
}

/// The externs of an object and the BTF facts needed to rewrite it.
#[derive(Clone, Debug, Default)]
pub struct Externs {
    /// The `__kconfig` externs, in DATASEC order.
    pub kconfig: Vec<Extern>,
    /// Type id of the `.kconfig` DATASEC.
    pub(super) datasec: u32,
}

impl Externs {
    /// Whether there is nothing to resolve.
    pub fn is_empty(&self) -> bool {
        self.kconfig.is_empty()
    }
}

/// The most bytes the resolved `.kconfig` section may take: far above any kernel's
/// configuration strings, and a bound on what a hostile object can make the agent allocate.
pub const MAX_KCONFIG_BYTES: u64 = 1 << 20;

/// `(offset, size)` of each extern in the resolved section, and the section's size; an
/// error naming the extern that takes it past [`MAX_KCONFIG_BYTES`].
pub(super) fn layout(externs: &Externs) -> Result<(Vec<(u32, u32)>, u32), String> {
    let mut at = 0u64;
    let mut out = Vec::new();
    for e in &externs.kconfig {
        let align = u64::from(e.kind.align().max(1));
        at = at.div_ceil(align) * align;
        let end = at + u64::from(e.size);
        if end > MAX_KCONFIG_BYTES {
            return Err(format!(
                "extern {} ({} bytes) takes the {KCONFIG_SECTION} section past {MAX_KCONFIG_BYTES} bytes",
                e.name, e.size
            ));
        }
        // Both fit in u32: they are at most MAX_KCONFIG_BYTES.
        out.push((at as u32, e.size));
        at = end;
    }
    Ok((out, (at.div_ceil(8).max(1) * 8) as u32))
}
