//! Capability names of the OCI spec (`CAP_KILL`, ...) and the sets `process.rs` applies.

use hull_protocol::{ErrorKind, ErrorResponse};

use crate::spec::Capabilities;
use crate::sys::CapSets;

/// Capability numbers from `include/uapi/linux/capability.h`, by index.
pub use hull_protocol::CAPABILITY_NAMES as NAMES;

/// What the process's capabilities become, as bit masks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CapPlan {
    pub bounding: u64,
    pub sets: CapSets,
    pub ambient: u64,
}

impl CapPlan {
    /// Reads `process.capabilities`; an unknown name is an error naming the set and the name.
    pub fn from_spec(caps: &Capabilities) -> Result<Self, ErrorResponse> {
        Ok(Self {
            bounding: mask("bounding", &caps.bounding)?,
            sets: CapSets {
                effective: mask("effective", &caps.effective)?,
                permitted: mask("permitted", &caps.permitted)?,
                inheritable: mask("inheritable", &caps.inheritable)?,
            },
            ambient: mask("ambient", &caps.ambient)?,
        })
    }
}

fn mask(set: &str, names: &[String]) -> Result<u64, ErrorResponse> {
    let mut bits = 0u64;
    for name in names {
        let index = NAMES.iter().position(|n| n == name).ok_or_else(|| {
            ErrorResponse::new(
                ErrorKind::InvalidSpec,
                format!("process.capabilities.{set}: unknown capability {name:?}"),
            )
        })?;
        bits |= 1 << index;
    }
    Ok(bits)
}

/// The highest capability the running kernel knows (`/proc/sys/kernel/cap_last_cap`).
pub fn last_cap(proc_dir: &std::path::Path) -> u32 {
    std::fs::read_to_string(proc_dir.join("sys/kernel/cap_last_cap"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(NAMES.len() as u32 - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_kernel_numbers() {
        assert_eq!(NAMES[5], "CAP_KILL");
        assert_eq!(NAMES[21], "CAP_SYS_ADMIN");
        assert_eq!(NAMES[40], "CAP_CHECKPOINT_RESTORE");
        let caps = Capabilities {
            bounding: vec!["CAP_KILL".into(), "CAP_CHOWN".into()],
            effective: vec!["CAP_KILL".into()],
            ..Capabilities::default()
        };
        let plan = CapPlan::from_spec(&caps).unwrap();
        assert_eq!(plan.bounding, (1 << 5) | 1);
        assert_eq!(plan.sets.effective, 1 << 5);
        assert_eq!(plan.ambient, 0);
    }

    #[test]
    fn unknown_names_are_named() {
        let caps = Capabilities {
            ambient: vec!["CAP_FLY".into()],
            ..Capabilities::default()
        };
        let err = CapPlan::from_spec(&caps).unwrap_err();
        assert_eq!(err.kind, ErrorKind::InvalidSpec);
        assert_eq!(
            err.message,
            "process.capabilities.ambient: unknown capability \"CAP_FLY\""
        );
    }
}
