//! The snapshot's state file: a fixed header, a bincode body, a CRC-32 of the body.
//!
//! ```text
//! offset  size  what
//! 0       8     magic "HULLSNAP"
//! 8       4     format version, little-endian (FORMAT_VERSION)
//! 12      8     body length in bytes, little-endian
//! 20      n     body: bincode (varint, trailing bytes refused) of the state
//! 20+n    4     CRC-32 (IEEE) of the body, little-endian
//! ```
//!
//! Anything else (a short file, another magic, another version, a length beyond the file or
//! the limit, a checksum that does not match, bytes after the checksum, a body that does not
//! decode) is an error naming the file and what is wrong: a snapshot is never half read.

use std::io::Write;
use std::path::{Path, PathBuf};

use bincode::Options;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// The first bytes of a state file.
pub const MAGIC: &[u8; 8] = b"HULLSNAP";
/// The layout of the body; bumped whenever a state type changes.
pub const FORMAT_VERSION: u32 = 1;
/// The largest body read (a VM's state is about 13 KiB a vCPU).
pub const MAX_BODY: u64 = 64 << 20;
const HEADER_LEN: usize = 20;
const CRC_LEN: usize = 4;

/// Why a state file cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    #[error("cannot read snapshot state file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write snapshot state file {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not a hull snapshot state file (it does not start with \"HULLSNAP\")", path.display())]
    Magic { path: PathBuf },
    #[error("{}: snapshot format version {found}, this hull-vmm reads version {FORMAT_VERSION}", path.display())]
    Version { path: PathBuf, found: u32 },
    #[error("{}: truncated: {len} bytes, the header says {expected}", path.display())]
    Truncated {
        path: PathBuf,
        len: u64,
        expected: u64,
    },
    #[error("{}: {len} bytes after the checksum", path.display())]
    Trailing { path: PathBuf, len: u64 },
    #[error("{}: body of {len} bytes is over the limit of {MAX_BODY}", path.display())]
    TooLarge { path: PathBuf, len: u64 },
    #[error("{}: checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): the file is corrupt", path.display())]
    Checksum {
        path: PathBuf,
        stored: u32,
        computed: u32,
    },
    #[error("{}: the state does not decode: {reason}", path.display())]
    Decode { path: PathBuf, reason: String },
    #[error("cannot encode the snapshot state: {0}")]
    Encode(String),
}

/// bincode with a limit, so that a length inside the body never allocates past it.
fn options() -> impl Options {
    bincode::DefaultOptions::new().with_limit(MAX_BODY)
}

/// The whole file for `state`.
pub fn encode<T: Serialize>(state: &T) -> Result<Vec<u8>, StateFileError> {
    let body = options()
        .serialize(state)
        .map_err(|e| StateFileError::Encode(e.to_string()))?;
    let mut out = Vec::with_capacity(HEADER_LEN + body.len() + CRC_LEN);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&body);
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    Ok(out)
}

/// Checks and decodes the bytes of `path`.
pub fn decode<T: DeserializeOwned>(path: &Path, bytes: &[u8]) -> Result<T, StateFileError> {
    let path = path.to_owned();
    let len = bytes.len() as u64;
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err(StateFileError::Magic { path });
    }
    if bytes.len() < HEADER_LEN {
        return Err(StateFileError::Truncated {
            path,
            len,
            expected: HEADER_LEN as u64,
        });
    }
    let word = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    let found = word(8);
    if found != FORMAT_VERSION {
        return Err(StateFileError::Version { path, found });
    }
    let body_len = u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes"));
    if body_len > MAX_BODY {
        return Err(StateFileError::TooLarge {
            path,
            len: body_len,
        });
    }
    let expected = HEADER_LEN as u64 + body_len + CRC_LEN as u64;
    if len < expected {
        return Err(StateFileError::Truncated {
            path,
            len,
            expected,
        });
    }
    if len > expected {
        return Err(StateFileError::Trailing {
            path,
            len: len - expected,
        });
    }
    let end = HEADER_LEN + body_len as usize;
    let body = &bytes[HEADER_LEN..end];
    let stored = word(end);
    let computed = crc32fast::hash(body);
    if stored != computed {
        return Err(StateFileError::Checksum {
            path,
            stored,
            computed,
        });
    }
    options()
        .deserialize(body)
        .map_err(|e| StateFileError::Decode {
            path,
            reason: e.to_string(),
        })
}

/// Reads and decodes `path`.
pub fn read<T: DeserializeOwned>(path: &Path) -> Result<T, StateFileError> {
    let bytes = std::fs::read(path).map_err(|source| StateFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    decode(path, &bytes)
}

/// Writes `state` to `path` whole or not at all: a temporary file beside it, synced, then
/// renamed over it.
pub fn write<T: Serialize>(path: &Path, state: &T) -> Result<(), StateFileError> {
    let bytes = encode(state)?;
    let err = |source| StateFileError::Write {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let result = std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(&bytes).and_then(|()| f.sync_all()))
        .and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(err)
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        name: String,
        words: Vec<u64>,
    }

    fn sample() -> Sample {
        Sample {
            name: "vcpu0".into(),
            words: (0..100).collect(),
        }
    }

    fn decoded(bytes: &[u8]) -> Result<Sample, String> {
        decode(Path::new("/s/state"), bytes).map_err(|e| e.to_string())
    }

    #[test]
    fn round_trip() {
        let bytes = encode(&sample()).unwrap();
        assert_eq!(&bytes[..8], MAGIC);
        assert_eq!(decoded(&bytes).unwrap(), sample());
    }

    #[test]
    fn every_truncation_is_an_error_naming_the_file() {
        let bytes = encode(&sample()).unwrap();
        for len in 0..bytes.len() {
            let err = decoded(&bytes[..len]).unwrap_err();
            assert!(err.starts_with("/s/state: "), "{len}: {err}");
            assert!(
                err.contains("truncated") || err.contains("not a hull snapshot"),
                "{len}: {err}"
            );
        }
    }

    #[test]
    fn every_flipped_bit_of_the_body_or_checksum_is_caught() {
        let bytes = encode(&sample()).unwrap();
        for at in HEADER_LEN..bytes.len() {
            for bit in 0..8 {
                let mut bad = bytes.clone();
                bad[at] ^= 1 << bit;
                let err = decoded(&bad).unwrap_err();
                assert!(
                    err.contains("checksum mismatch"),
                    "byte {at} bit {bit}: {err}"
                );
            }
        }
    }

    #[test]
    fn another_magic_version_length_or_trailing_bytes_are_refused() {
        let bytes = encode(&sample()).unwrap();
        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert!(decoded(&bad).unwrap_err().contains("not a hull snapshot"));

        let mut bad = bytes.clone();
        bad[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        let err = decoded(&bad).unwrap_err();
        assert!(
            err.contains(&format!(
                "version {}, this hull-vmm reads version",
                FORMAT_VERSION + 1
            )),
            "{err}"
        );

        let mut bad = bytes.clone();
        bad[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(decoded(&bad).unwrap_err().contains("over the limit"));

        let mut bad = bytes.clone();
        bad.push(0);
        assert!(decoded(&bad)
            .unwrap_err()
            .contains("1 bytes after the checksum"));
    }

    #[test]
    fn a_body_that_does_not_decode_is_an_error() {
        // A valid frame around bytes that are not a `Sample`.
        let bytes = encode(&7u8).unwrap();
        assert!(decoded(&bytes).unwrap_err().contains("does not decode"));
    }

    #[test]
    fn write_then_read_and_no_temporary_file_is_left() {
        let dir = std::env::temp_dir().join(format!("hull-statefile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state");
        write(&path, &sample()).unwrap();
        assert_eq!(read::<Sample>(&path).unwrap(), sample());
        assert!(!dir.join("state.tmp").exists());
        let err = read::<Sample>(&dir.join("missing"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot read snapshot state file"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
