//! The capability sets `process.rs` applies, from `process.capabilities` as the host sends it:
//! one mask per set, bit N for capability number N (`include/uapi/linux/capability.h`).

use hull_protocol::spec::Capabilities;
use hull_protocol::{ErrorKind, ErrorResponse};

use crate::sys::CapSets;

/// The OCI names of the capabilities, by number: those the agent can apply.
pub use hull_protocol::CAPABILITY_NAMES as NAMES;

/// What the process's capabilities become, as bit masks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CapPlan {
    pub bounding: u64,
    pub sets: CapSets,
    pub ambient: u64,
}

impl CapPlan {
    /// Takes `process.capabilities`. The host sends only capabilities of [`NAMES`]; a bit
    /// beyond them is an error naming the set and the bit rather than a `capset` failure later.
    pub fn from_spec(caps: &Capabilities) -> Result<Self, ErrorResponse> {
        Ok(Self {
            bounding: known("bounding", caps.bounding)?,
            sets: CapSets {
                effective: known("effective", caps.effective)?,
                permitted: known("permitted", caps.permitted)?,
                inheritable: known("inheritable", caps.inheritable)?,
            },
            ambient: known("ambient", caps.ambient)?,
        })
    }
}

fn known(set: &str, mask: u64) -> Result<u64, ErrorResponse> {
    let unknown = mask.checked_shr(NAMES.len() as u32).unwrap_or(0);
    if unknown == 0 {
        return Ok(mask);
    }
    let bit = NAMES.len() as u32 + unknown.trailing_zeros();
    Err(ErrorResponse::new(
        ErrorKind::InvalidSpec,
        format!(
            "process.capabilities.{set}: unknown capability number {bit} (the agent knows 0 to {})",
            NAMES.len() - 1
        ),
    ))
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
    fn masks_are_kernel_numbers() {
        assert_eq!(NAMES[5], "CAP_KILL");
        assert_eq!(NAMES[21], "CAP_SYS_ADMIN");
        assert_eq!(NAMES[40], "CAP_CHECKPOINT_RESTORE");
        let caps = Capabilities {
            bounding: Capabilities::mask(["CAP_KILL", "CAP_CHOWN"]).unwrap(),
            effective: Capabilities::mask(["CAP_KILL"]).unwrap(),
            permitted: Capabilities::mask(["CAP_CHECKPOINT_RESTORE"]).unwrap(),
            ..Capabilities::default()
        };
        let plan = CapPlan::from_spec(&caps).unwrap();
        assert_eq!(plan.bounding, (1 << 5) | 1);
        assert_eq!(plan.sets.effective, 1 << 5);
        assert_eq!(plan.sets.permitted, 1 << 40);
        assert_eq!(plan.ambient, 0);
    }

    #[test]
    fn unknown_bits_are_named() {
        let caps = Capabilities {
            ambient: 1 << 5 | 1 << 50 | 1 << 63,
            ..Capabilities::default()
        };
        let err = CapPlan::from_spec(&caps).unwrap_err();
        assert_eq!(err.kind, ErrorKind::InvalidSpec);
        assert_eq!(
            err.message,
            "process.capabilities.ambient: unknown capability number 50 (the agent knows 0 to 40)"
        );
        let caps = Capabilities {
            bounding: 1 << 41,
            ..Capabilities::default()
        };
        let err = CapPlan::from_spec(&caps).unwrap_err();
        assert!(
            err.message
                .starts_with("process.capabilities.bounding: unknown capability number 41"),
            "{}",
            err.message
        );
    }
}
