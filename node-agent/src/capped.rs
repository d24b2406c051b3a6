//! Reading a file of bounded size. The size is checked before the read and again while
//! reading, at most one byte past the limit: a file may grow after the check, and sysfs
//! reports sizes that are not always exact.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

/// A file that could not be read within its limit, named.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The file could not be opened or read (a directory is "is a directory").
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The file is larger than the limit.
    #[error("{} is larger than the limit of {limit} bytes", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The limit in bytes.
        limit: u64,
    },
}

/// Why a capped read gave no bytes.
#[derive(Debug)]
pub enum Capped {
    /// Opening or reading failed (a directory is "is a directory").
    Io(io::Error),
    /// The file has more than the limit: its size, as far as it was seen.
    TooLarge(u64),
}

/// Reads `path`, refusing directories and anything over `max_bytes`.
pub fn read_path(path: &Path, max_bytes: u64) -> Result<Vec<u8>, FileError> {
    let read = || -> Result<Vec<u8>, Capped> {
        let mut file = File::open(path).map_err(Capped::Io)?;
        let meta = file.metadata().map_err(Capped::Io)?;
        if meta.is_dir() {
            return Err(Capped::Io(io::Error::other("is a directory")));
        }
        read_file(&mut file, meta.len(), max_bytes)
    };
    read().map_err(|e| match e {
        Capped::Io(source) => FileError::Read {
            path: path.to_path_buf(),
            source,
        },
        Capped::TooLarge(_) => FileError::TooLarge {
            path: path.to_path_buf(),
            limit: max_bytes,
        },
    })
}

/// Reads an open file whose metadata gave `len`, refusing anything over `max_bytes`.
pub fn read_file(file: &mut File, len: u64, max_bytes: u64) -> Result<Vec<u8>, Capped> {
    if len > max_bytes {
        return Err(Capped::TooLarge(len));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    file.take(max_bytes.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(Capped::Io)?;
    if bytes.len() as u64 > max_bytes {
        return Err(Capped::TooLarge(bytes.len() as u64));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_is_inclusive_and_directories_are_refused() {
        let dir = std::env::temp_dir().join(format!("bpfpoly-capped-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        let f = dir.join("f");
        std::fs::write(&f, b"12345").expect("a file");
        assert_eq!(read_path(&f, 5).expect("at the limit").len(), 5);
        let msg = |r: Result<Vec<u8>, FileError>| r.map(|_| ()).unwrap_err().to_string();
        let at = f.display();
        assert_eq!(
            msg(read_path(&f, 4)),
            format!("{at} is larger than the limit of 4 bytes")
        );
        assert_eq!(
            msg(read_path(&dir, 5)),
            format!("cannot read {}: is a directory", dir.display())
        );
        assert!(msg(read_path(&dir.join("none"), 5)).starts_with("cannot read "));
        // A size that understates the content (as sysfs may): caught while reading.
        let mut file = File::open(&f).expect("opens");
        assert!(matches!(
            read_file(&mut file, 0, 3),
            Err(Capped::TooLarge(4))
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
