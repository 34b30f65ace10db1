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
}

impl HostHello {
    /// The hello of a host built with this crate.
    pub fn new(host_version: impl Into<String>) -> Self {
        Self {
            protocol_version: PROTOCOL_VERSION,
            min_protocol_version: MIN_PROTOCOL_VERSION,
            host_version: host_version.into(),
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
