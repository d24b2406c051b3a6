//! Why an object cannot be used, and the section limit its message names.

/// Most sections an object may have. Real objects have tens to a few hundred.
pub const MAX_SECTIONS: usize = 4096;

/// Why an object cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// The file could not be read within its limit.
    #[error(transparent)]
    File(#[from] crate::capped::FileError),
    /// Zero bytes.
    #[error("empty file (0 bytes), not an eBPF object")]
    Empty,
    /// Not ELF at all.
    #[error("not an ELF file (no \\x7fELF magic), not an eBPF object")]
    NotElf,
    /// ELF, but broken.
    #[error("malformed ELF: {0}")]
    Malformed(String),
    /// A valid ELF that is not an eBPF object.
    #[error("not an eBPF object: {0}")]
    NotBpf(String),
    /// Too many sections.
    #[error("too many sections: {count} (limit {MAX_SECTIONS})")]
    TooManySections {
        /// How many there are.
        count: usize,
    },
    /// The loader's parser refused it (it could not be loaded either).
    #[error("the loader cannot parse this object: {0}")]
    Loader(String),
    /// An extern the loader cannot resolve (named in the message).
    #[error("unresolvable extern: {}", .0.join("; "))]
    Extern(Vec<String>),
}
