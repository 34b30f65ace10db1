//! The readiness line.
//!
//! Once the guest is set up, the agent prints exactly one line on the console:
//!
//! ```text
//! HULL_AGENT_READY {"version":1,"kernel_release":"6.12.0","uptime_ms":43210}
//! ```
//!
//! The host-side VMM, its tests and benchmarks look for the [`READY_PREFIX`] and parse the JSON
//! after it. `version` changes only when the meaning of a field changes; new fields may be added.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// What the line starts with, including the single space before the JSON.
pub const READY_PREFIX: &str = "HULL_AGENT_READY ";
/// The version of the readiness record.
pub const READY_VERSION: u32 = 1;

/// Errors gathering what the readiness line reports.
#[derive(Debug, thiserror::Error)]
pub enum ReadyError {
    #[error("cannot read uptime from {path}")]
    ReadUptime {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed uptime {text:?}")]
    ParseUptime { text: String },
    #[error("uname failed")]
    Uname(#[source] nix::Error),
    #[error("kernel release is not valid UTF-8")]
    KernelRelease,
    #[error("cannot encode the readiness record")]
    Encode(#[source] serde_json::Error),
}

/// The record after [`READY_PREFIX`]. Field order is the order on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ready {
    /// [`READY_VERSION`].
    pub version: u32,
    /// `uname -r` of the guest kernel.
    pub kernel_release: String,
    /// Time since the kernel started, from `/proc/uptime`, in milliseconds.
    pub uptime_ms: u64,
}

impl Ready {
    /// Gathers the record: kernel release from `uname(2)`, uptime from `uptime_path`
    /// (normally `/proc/uptime`).
    pub fn gather(uptime_path: &Path) -> Result<Self, ReadyError> {
        let uts = nix::sys::utsname::uname().map_err(ReadyError::Uname)?;
        let kernel_release = uts
            .release()
            .to_str()
            .ok_or(ReadyError::KernelRelease)?
            .to_owned();
        let text =
            std::fs::read_to_string(uptime_path).map_err(|source| ReadyError::ReadUptime {
                path: uptime_path.display().to_string(),
                source,
            })?;
        Ok(Self {
            version: READY_VERSION,
            kernel_release,
            uptime_ms: parse_uptime_ms(&text)?,
        })
    }

    /// The whole line, without a newline.
    pub fn line(&self) -> Result<String, ReadyError> {
        let json = serde_json::to_string(self).map_err(ReadyError::Encode)?;
        Ok(format!("{READY_PREFIX}{json}"))
    }
}

/// Parses the first field of `/proc/uptime` ("seconds.fraction", e.g. `43.21 80.00`) into
/// milliseconds, without going through floating point.
pub fn parse_uptime_ms(text: &str) -> Result<u64, ReadyError> {
    let malformed = || ReadyError::ParseUptime {
        text: text.to_owned(),
    };
    let first = text.split_whitespace().next().ok_or_else(malformed)?;
    let (secs, frac) = first.split_once('.').unwrap_or((first, ""));
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if secs.is_empty() || !all_digits(secs) || !all_digits(frac) {
        return Err(malformed());
    }
    let secs: u64 = secs.parse().map_err(|_| malformed())?;
    // Milliseconds are the first three digits of the fraction, padded with zeros.
    let mut millis = 0u64;
    for d in frac.bytes().chain(std::iter::repeat(b'0')).take(3) {
        millis = millis * 10 + u64::from(d - b'0');
    }
    secs.checked_mul(1000)
        .and_then(|ms| ms.checked_add(millis))
        .ok_or_else(malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uptime_in_milliseconds() {
        assert_eq!(parse_uptime_ms("43.21 80.00\n").unwrap(), 43_210);
        assert_eq!(parse_uptime_ms("0.05 0.00").unwrap(), 50);
        assert_eq!(parse_uptime_ms("7 1").unwrap(), 7_000);
        assert_eq!(parse_uptime_ms("12.3456 1").unwrap(), 12_345);
        assert_eq!(parse_uptime_ms("1234567.89 1").unwrap(), 1_234_567_890);
    }

    #[test]
    fn malformed_uptime() {
        for bad in [
            "",
            " \n",
            "x.12 3",
            "-1.00 2",
            "1.-2 3",
            ".5 1",
            "99999999999999999999.00",
        ] {
            assert!(parse_uptime_ms(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn line_is_prefix_and_json_on_one_line() {
        let ready = Ready {
            version: READY_VERSION,
            kernel_release: "6.12.0-hull \"x\"".to_owned(),
            uptime_ms: 43_210,
        };
        let line = ready.line().unwrap();
        assert!(!line.contains('\n'));
        let json = line.strip_prefix(READY_PREFIX).unwrap();
        assert!(!json.starts_with(' '));
        let back: Ready = serde_json::from_str(json).unwrap();
        assert_eq!(back, ready);
        assert_eq!(
            line,
            r#"HULL_AGENT_READY {"version":1,"kernel_release":"6.12.0-hull \"x\"","uptime_ms":43210}"#
        );
    }

    #[test]
    fn gathers_from_this_kernel() {
        let ready = Ready::gather(Path::new("/proc/uptime")).unwrap();
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        assert_eq!(ready.kernel_release, release.trim_end());
        assert_eq!(ready.version, 1);
        assert!(ready.uptime_ms > 0);
    }
}
