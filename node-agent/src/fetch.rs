//! Bytecode from the node's filesystem (`bytecode.path`), the SHA-256 check that
//! every source goes through (builtin, ConfigMap, path), and bytecode fetched ahead
//! of a load ([`Prefetched`]).
//!
//! The messages name the source, not the field: whoever reports them says what was
//! being fetched (the loader writes `bytecode: ...`, `handler bytecode: ...`).
//!
//! A path is untrusted input from a custom resource: it must be absolute, free of
//! `..`, resolve (symlinks followed) to a regular file under one of the agent's
//! allowed directories, and be no larger than the limit, checked before the file is
//! read. The file that is finally read is checked again through `/proc/self/fd`, so a
//! component swapped for a symlink between the check and the open cannot escape.

use std::{
    collections::HashMap,
    fs::{self, File},
    io,
    os::{fd::AsRawFd, unix::fs::OpenOptionsExt},
    path::{Component, Path, PathBuf},
};

use bpfpoly_crds::program::Bytecode;
use sha2::{Digest, Sha256};

/// Default size limit of an object file.
pub const DEFAULT_MAX_OBJECT_BYTES: u64 = 16 << 20;

/// `O_NONBLOCK` on Linux (x86, arm, riscv, powerpc, s390): opening a FIFO planted in
/// an allowed directory must not block the agent. The type check after the open
/// rejects it.
const O_NONBLOCK: i32 = 0o4000;

/// Why bytecode could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// `bytecode.path` is relative.
    #[error("path {path:?} is not absolute")]
    NotAbsolute {
        /// The path as written.
        path: String,
    },
    /// `bytecode.path` has a `..` component.
    #[error("path {path:?} contains a `..` component")]
    ParentComponent {
        /// The path as written.
        path: String,
    },
    /// The agent was started without allowed bytecode directories.
    #[error("path {path:?} cannot be used: the agent allows no bytecode directories")]
    NoAllowedDirs {
        /// The path as written.
        path: String,
    },
    /// The path (after resolving symlinks) is not under an allowed directory.
    #[error(
        "path {path:?} resolves to {}, outside the allowed directories ({allowed})",
        resolved.display()
    )]
    OutsideAllowedDirs {
        /// The path as written.
        path: String,
        /// Where it resolves to.
        resolved: PathBuf,
        /// The allowed directories, comma separated.
        allowed: String,
    },
    /// The path could not be resolved, opened or read.
    #[error("path {path:?}: {source}")]
    Io {
        /// The path as written.
        path: String,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The path is not a regular file.
    #[error("path {path:?} is not a regular file")]
    NotAFile {
        /// The path as written.
        path: String,
    },
    /// The object is larger than the agent accepts.
    #[error("{what} is {size} bytes, over the limit of {limit} bytes")]
    TooLarge {
        /// Which source.
        what: String,
        /// Its size (at least; reading stops past the limit).
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// A source that requires `sha256` has none.
    #[error("{what} has no sha256; it is required for this source")]
    MissingSha256 {
        /// Which source.
        what: String,
    },
    /// `sha256` is not 64 lowercase hex digits.
    #[error("sha256 {value:?} is not 64 lowercase hex digits")]
    BadSha256 {
        /// The value as written.
        value: String,
    },
    /// The content does not match `sha256`.
    #[error("sha256 mismatch: expected {expected}, the bytecode has {actual}")]
    Sha256Mismatch {
        /// The declared digest.
        expected: String,
        /// The digest of the bytes fetched.
        actual: String,
    },
    /// A source the caller resolves (builtin, ConfigMap) is unavailable.
    #[error("{what}: {reason}")]
    Unavailable {
        /// Which source, e.g. `builtin "x"` or `configMap ns/name key k`.
        what: String,
        /// Why.
        reason: String,
    },
    /// A fetch that failed before the load ([`Prefetched`]), with its message.
    #[error("{0}")]
    Earlier(String),
}

/// Bytecode fetched before a load, by source: the agent reads ConfigMaps from the
/// API server (async) before the blocking load, whose `fetch` then takes the bytes
/// or the error from here. Errors keep their message as it was, so it names the
/// source and the cause once.
#[derive(Debug, Default)]
pub struct Prefetched(HashMap<String, Result<Vec<u8>, String>>);

impl Prefetched {
    fn key(source: &Bytecode) -> String {
        serde_json::to_string(source).unwrap_or_default()
    }

    /// Whether `source` has been fetched (or failed).
    pub fn contains(&self, source: &Bytecode) -> bool {
        self.0.contains_key(&Self::key(source))
    }

    /// Records what fetching `source` gave.
    pub fn insert(&mut self, source: &Bytecode, got: Result<Vec<u8>, FetchError>) {
        self.0
            .insert(Self::key(source), got.map_err(|e| e.to_string()));
    }

    /// The bytes of `source`, or why there are none (`Loader::apply`'s `fetch`).
    pub fn get(&self, source: &Bytecode) -> Result<Vec<u8>, FetchError> {
        match self.0.get(&Self::key(source)) {
            Some(Ok(bytes)) => Ok(bytes.clone()),
            Some(Err(message)) => Err(FetchError::Earlier(message.clone())),
            None => Err(FetchError::Unavailable {
                what: describe(source),
                reason: "not fetched before the load".into(),
            }),
        }
    }
}

/// The source as the messages name it: `builtin "x"`, `configMap ns/name key k`,
/// `path "/p"`.
pub fn describe(source: &Bytecode) -> String {
    if let Some(name) = &source.builtin {
        return format!("builtin {name:?}");
    }
    if let Some(cm) = &source.config_map {
        return format!("configMap {}/{} key {}", cm.namespace, cm.name, cm.key);
    }
    if let Some(path) = &source.path {
        return format!("path {path:?}");
    }
    "source".into()
}

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Checks `bytes` against `expected` (lowercase hex SHA-256) when one is given.
pub fn check_sha256(bytes: &[u8], expected: Option<&str>) -> Result<(), FetchError> {
    let Some(expected) = expected else {
        return Ok(());
    };
    if expected.len() != 64
        || !expected
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(FetchError::BadSha256 {
            value: expected.to_owned(),
        });
    }
    let actual = sha256_hex(bytes);
    if actual != expected {
        return Err(FetchError::Sha256Mismatch {
            expected: expected.to_owned(),
            actual,
        });
    }
    Ok(())
}

/// Reads the object at `path`, which must resolve to a regular file under one of
/// `allowed_dirs`, be at most `max_bytes` long and match `sha256` (required).
pub fn fetch_path(
    path: &str,
    sha256: Option<&str>,
    allowed_dirs: &[PathBuf],
    max_bytes: u64,
) -> Result<Vec<u8>, FetchError> {
    let io_err = |source| FetchError::Io {
        path: path.to_owned(),
        source,
    };
    let requested = Path::new(path);
    if !requested.is_absolute() {
        return Err(FetchError::NotAbsolute {
            path: path.to_owned(),
        });
    }
    if requested.components().any(|c| c == Component::ParentDir) {
        return Err(FetchError::ParentComponent {
            path: path.to_owned(),
        });
    }
    let Some(sha256) = sha256 else {
        return Err(FetchError::MissingSha256 {
            what: format!("path {path:?}"),
        });
    };
    // Malformed digests are reported before touching the file.
    check_sha256(&[], Some(sha256)).or_else(|e| match e {
        FetchError::Sha256Mismatch { .. } => Ok(()),
        other => Err(other),
    })?;
    let allowed: Vec<PathBuf> = allowed_dirs
        .iter()
        .filter_map(|d| fs::canonicalize(d).ok())
        .collect();
    if allowed.is_empty() {
        return Err(FetchError::NoAllowedDirs {
            path: path.to_owned(),
        });
    }
    let outside = |resolved: PathBuf| FetchError::OutsideAllowedDirs {
        path: path.to_owned(),
        resolved,
        allowed: allowed_dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    };
    let under_allowed = |p: &Path| allowed.iter().any(|dir| p.starts_with(dir) && p != dir);

    let resolved = fs::canonicalize(requested).map_err(io_err)?;
    if !under_allowed(&resolved) {
        return Err(outside(resolved));
    }
    let mut file = File::options()
        .read(true)
        .custom_flags(O_NONBLOCK)
        .open(&resolved)
        .map_err(io_err)?;
    // What was opened, whatever happened to the path since it was resolved.
    let opened = fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())).map_err(io_err)?;
    if !under_allowed(&opened) {
        return Err(outside(opened));
    }
    let meta = file.metadata().map_err(io_err)?;
    if !meta.is_file() {
        return Err(FetchError::NotAFile {
            path: path.to_owned(),
        });
    }
    let too_large = |size| FetchError::TooLarge {
        what: format!("path {path:?}"),
        size,
        limit: max_bytes,
    };
    let bytes =
        crate::capped::read_file(&mut file, meta.len(), max_bytes).map_err(|e| match e {
            crate::capped::Capped::Io(e) => io_err(e),
            crate::capped::Capped::TooLarge(size) => too_large(size),
        })?;
    check_sha256(&bytes, Some(sha256))?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_nothing_is_the_known_digest() {
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert!(check_sha256(b"", Some(&sha256_hex(b""))).is_ok());
        assert!(check_sha256(b"x", None).is_ok());
    }

    fn source(json: serde_json::Value) -> Bytecode {
        serde_json::from_value(json).unwrap_or_else(|e| panic!("a Bytecode: {e}"))
    }

    /// The loader reports a fetch error as `bytecode: {error}`: the error names the
    /// source and the cause, and says "bytecode" no second time.
    #[test]
    fn messages_name_the_source_once() {
        let report = |e: FetchError| format!("bytecode: {e}");
        let cm = source(serde_json::json!({
            "configMap": {"namespace": "ns", "name": "progs", "key": "prog.o"},
            "sha256": sha256_hex(b""),
        }));
        let builtin = source(serde_json::json!({"builtin": "nope"}));
        let path = source(serde_json::json!({"path": "/srv/prog.o"}));
        let cases = [
            (
                FetchError::Unavailable {
                    what: describe(&cm),
                    reason: "ConfigMap not found".into(),
                },
                "bytecode: configMap ns/progs key prog.o: ConfigMap not found",
            ),
            (
                FetchError::Unavailable {
                    what: describe(&builtin),
                    reason: "no such built-in object".into(),
                },
                "bytecode: builtin \"nope\": no such built-in object",
            ),
            (
                fetch_path("relative.o", None, &[], 1).unwrap_err(),
                "bytecode: path \"relative.o\" is not absolute",
            ),
            (
                fetch_path("/srv/prog.o", None, &[], 1).unwrap_err(),
                "bytecode: path \"/srv/prog.o\" has no sha256; it is required for this source",
            ),
            (
                FetchError::TooLarge {
                    what: describe(&path),
                    size: 10,
                    limit: 5,
                },
                "bytecode: path \"/srv/prog.o\" is 10 bytes, over the limit of 5 bytes",
            ),
        ];
        for (e, expected) in cases {
            assert_eq!(report(e), expected);
        }
    }

    /// Bytes and errors fetched before the load come back as they were: an error
    /// keeps its message (no second "bytecode" around it), the bytes are the bytes.
    #[test]
    fn prefetched_sources_come_back_unchanged() {
        let cm = source(serde_json::json!({
            "configMap": {"namespace": "ns", "name": "progs", "key": "prog.o"},
            "sha256": sha256_hex(b""),
        }));
        let other = source(serde_json::json!({
            "configMap": {"namespace": "ns", "name": "progs", "key": "other.o"},
            "sha256": sha256_hex(b""),
        }));
        let builtin = source(serde_json::json!({"builtin": "xdp-pass"}));
        let mut p = Prefetched::default();
        assert!(!p.contains(&cm));
        p.insert(
            &cm,
            Err(FetchError::Unavailable {
                what: describe(&cm),
                reason: "ConfigMap not found".into(),
            }),
        );
        p.insert(&builtin, Ok(b"\x7fELF".to_vec()));
        assert!(p.contains(&cm) && p.contains(&builtin) && !p.contains(&other));

        let e = p.get(&cm).unwrap_err();
        assert!(matches!(e, FetchError::Earlier(_)), "{e:?}");
        assert_eq!(
            format!("bytecode: {e}"),
            "bytecode: configMap ns/progs key prog.o: ConfigMap not found"
        );
        assert_eq!(p.get(&builtin).ok(), Some(b"\x7fELF".to_vec()));
        assert_eq!(
            format!("bytecode: {}", p.get(&other).unwrap_err()),
            "bytecode: configMap ns/progs key other.o: not fetched before the load"
        );
        assert_eq!(describe(&Bytecode::default()), "source");
    }

    #[test]
    fn malformed_or_mismatched_digests_are_errors() {
        assert!(matches!(
            check_sha256(b"", Some("ABC")),
            Err(FetchError::BadSha256 { .. })
        ));
        let upper = sha256_hex(b"").to_uppercase();
        assert!(matches!(
            check_sha256(b"", Some(&upper)),
            Err(FetchError::BadSha256 { .. })
        ));
        assert!(matches!(
            check_sha256(b"y", Some(&sha256_hex(b""))),
            Err(FetchError::Sha256Mismatch { .. })
        ));
    }
}
