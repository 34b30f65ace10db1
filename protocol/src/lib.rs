//! The protocol between the host (`hull-vmm`, `hull`) and `hull-agent` in the guest.
//!
//! Everything runs over virtio-vsock; the guest is [`GUEST_CID`]. The agent listens on two
//! ports, and the host opens every connection (through the VMM's hybrid vsock Unix socket,
//! [`hybrid`]):
//! - [`CONTROL_PORT`]: one control connection. A versioned handshake ([`handshake`]), then
//!   length-prefixed JSON frames ([`frame`]) carrying requests, responses and events
//!   ([`message`]). The hello messages and version numbers are in [`hello`], which both
//!   [`handshake`] and [`message`] import.
//! - [`STDIO_PORT`]: one connection per stdio stream of a process: one header frame each way,
//!   then raw bytes ([`stdio`]).
//!
//! A container's spec travels in the protocol's own types ([`spec`]), read and checked from the
//! bundle's `config.json` by the host.
//!
//! The full description, with examples, is docs/protocol.md. Both sides link this crate; the
//! agent is a static binary, so it depends on serde, serde_json and thiserror only.

#![forbid(unsafe_code)]

pub mod frame;
pub mod handshake;
pub mod hello;
pub mod hybrid;
pub mod message;
pub mod spec;
pub mod stdio;
pub mod unix_path;

pub use frame::{
    decode_body, encode_frame, read_frame, read_frame_body, write_frame, FrameDecoder, FrameError,
    ReadOutcome, HEADER_LEN, MAX_FRAME_SIZE,
};
pub use handshake::{
    agent_handshake, answer_hello, check_answer, host_handshake, negotiate, HandshakeError,
    VersionMismatch,
};
pub use hello::{
    AgentHello, HelloRejected, HostHello, Seed, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
    SEED_ENTROPY_BYTES,
};
pub use message::{
    format_mac, parse_mac, request_id_of, AgentMessage, ContainerStats, CreateContainer, ErrorKind,
    ErrorResponse, Event, Exec, ExitStatus, HostMessage, NetInterface, NetRoute, NetworkConfig,
    ProcessInfo, ProcessRef, Request, RequestBody, Resources, Response, ResponseBody, Rootfs,
    Stdio, StreamKind, BINDS_DIR, BINDS_FS_TAG, CAPABILITY_NAMES, POD_DIR, POD_FS_TAG,
};
pub use stdio::{attach_stream, read_stream_hello, StreamError, StreamHello, StreamReply};

/// The host's context id (`VMADDR_CID_HOST`).
pub const HOST_CID: u32 = 2;
/// The guest's context id: every hull VM has one guest, always this one.
pub const GUEST_CID: u32 = 3;
/// The agent's control port: the host's one control connection.
pub const CONTROL_PORT: u32 = 1024;
/// The agent's stdio port: one host connection per stdio stream (see [`stdio`]).
pub const STDIO_PORT: u32 = 1025;
