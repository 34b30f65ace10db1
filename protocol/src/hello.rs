//! The hello messages that open the control connection, and the protocol versions they carry.
//!
//! Apart from [`crate::handshake`] (which exchanges them) because [`crate::message`] carries
//! them too: both modules import this one, and it imports neither.
//!
//! The layouts of the hello messages are frozen: every version of either side must be able to
//! read every version's hello, so that a mismatch is reported by name rather than as a parse
//! error. Fields may be added to them (old readers ignore unknown fields), never changed.

use serde::{Deserialize, Serialize};

/// The newest protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 2;
/// The oldest protocol version this crate still speaks.
pub const MIN_PROTOCOL_VERSION: u32 = 2;

/// The host's first frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostHello {
    /// The newest version the host speaks.
    pub protocol_version: u32,
    /// The oldest version the host speaks.
    pub min_protocol_version: u32,
    /// The host's program version, for messages and logs.
    pub host_version: String,
    /// What makes this VM its own, which the agent applies before anything else: a VM
    /// restored from a snapshot shares the snapshot's random-number state and clock with every
    /// other VM restored from it. Added in version 2; absent means nothing to apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<Seed>,
}

/// Fresh entropy and the host's wall clock, for the guest's random-number generator and clock.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seed {
    /// Random bytes from the host's kernel, credited to the guest's entropy pool.
    pub entropy: Vec<u8>,
    /// The host's `CLOCK_REALTIME` when the hello was written, in nanoseconds since the epoch.
    pub realtime_ns: u64,
}

impl std::fmt::Debug for Seed {
    /// Never prints the entropy.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Seed")
            .field("entropy", &format_args!("[{} bytes]", self.entropy.len()))
            .field("realtime_ns", &self.realtime_ns)
            .finish()
    }
}

/// Bytes of entropy a seed carries (256 bits: what the guest's CRNG needs to be fully seeded).
pub const SEED_ENTROPY_BYTES: usize = 32;

impl Seed {
    /// Entropy from the host's `/dev/urandom` and the host's clock now.
    pub fn from_host() -> std::io::Result<Self> {
        use std::io::Read;
        let mut entropy = vec![0u8; SEED_ENTROPY_BYTES];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut entropy)?;
        let realtime_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        Ok(Self {
            entropy,
            realtime_ns,
        })
    }
}

impl HostHello {
    /// The hello of a host built with this crate, without a seed.
    pub fn new(host_version: impl Into<String>) -> Self {
        Self {
            protocol_version: PROTOCOL_VERSION,
            min_protocol_version: MIN_PROTOCOL_VERSION,
            host_version: host_version.into(),
            seed: None,
        }
    }
}

/// The agent's answer to a compatible hello.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentHello {
    /// The version both sides use from now on.
    pub protocol_version: u32,
    /// The agent's program version.
    pub agent_version: String,
    /// `uname -r` of the guest kernel.
    pub kernel_release: String,
}

/// The agent's answer to an incompatible hello (or to a first frame that is no hello).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloRejected {
    /// The newest version the agent speaks.
    pub protocol_version: u32,
    /// The oldest version the agent speaks.
    pub min_protocol_version: u32,
    pub agent_version: String,
    /// Why, for people: e.g. the [`VersionMismatch`] text.
    pub message: String,
}
