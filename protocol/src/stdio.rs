//! Stdio streams: one vsock connection per stream, raw bytes after a one-frame header.
//!
//! # The design
//! The host opens every stream connection, to the agent's [`crate::STDIO_PORT`]. Its first
//! frame is a [`StreamHello`] naming the process and the stream; the agent answers one
//! [`StreamReply`] frame. After [`StreamReply::Accepted`] the connection carries the stream's
//! raw bytes with no framing, in the direction of its [`StreamKind`]. The host opens a request's
//! streams and waits for their replies *before* it sends the request (`create_container`,
//! `exec`), so the agent has every stream registered when the request arrives, although vsock
//! orders nothing across connections; a request whose streams are not all attached fails with
//! `invalid_state`. Stream connections left unclaimed die with the control connection.
//!
//! Why host-to-guest connections with a header, rather than the agent connecting out to ports
//! the host names:
//! - Only the agent can answer. It binds its ports at boot, before any container code runs,
//!   and guest processes cannot reach a guest listener over vsock. The other way round, any
//!   process in the guest with an `AF_VSOCK` socket could connect to the host's listening port
//!   first and take a stream, e.g. read what a person types into a later `hull exec -t`.
//! - Hybrid vsock on the host side needs nothing new: host-to-guest connections all go through
//!   the VMM's one Unix socket with `CONNECT <port>\n` ([`crate::hybrid`]). Guest-to-host
//!   connections would need a listening Unix socket `<uds>_<port>` per port, made before each
//!   request and cleaned up after it, inside the VMM's jail, plus a port allocator.
//! - The reply makes the setup synchronous and its errors explicit (unknown stream, duplicate
//!   stream) instead of a request that waits for connections that never come.
//!
//! # Rules
//! - Neither side sends anything on the connection between the hello and the reply, and both
//!   read these two frames with exact reads ([`crate::read_frame`], which never reads past the
//!   frame), not a buffered reader: the bytes after the reply are the stream's.
//! - No half-close is needed (hybrid vsock backends differ there): a stdin connection is closed
//!   whole by the host at the end of its input; stdout and stderr connections are closed by the
//!   agent at the end of the process's output; a terminal connection is closed by the agent once
//!   the process has ended and the pty is drained (the host may close it to hang up).
//! - A stream the request's [`crate::Stdio`] does not name is `/dev/null` in the guest; a
//!   stream hello for a process that already exists, or a second one for the same stream, is
//!   rejected with `already_exists`.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

use crate::frame::{decode_body, read_frame_body, write_frame, FrameError};
use crate::message::{ErrorResponse, ProcessRef, StreamKind};

/// The largest [`StreamHello`] or [`StreamReply`] frame body, in bytes.
pub const MAX_STREAM_HEADER_SIZE: u32 = 4 << 10;

/// The host's first frame on a stream connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StreamHello {
    pub process: ProcessRef,
    pub stream: StreamKind,
}

/// The agent's answer to a [`StreamHello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamReply {
    /// From now on the connection is the stream.
    Accepted,
    /// The agent closes the connection after this.
    Rejected(ErrorResponse),
}

/// Errors setting up a stream connection.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("cannot set up the {stream} stream of {process}")]
    Frame {
        process: ProcessRef,
        stream: StreamKind,
        #[source]
        source: FrameError,
    },
    #[error("agent closed the {stream} stream of {process} before answering")]
    Closed {
        process: ProcessRef,
        stream: StreamKind,
    },
    #[error("agent rejected the {stream} stream of {process}")]
    Rejected {
        process: ProcessRef,
        stream: StreamKind,
        #[source]
        source: ErrorResponse,
    },
    #[error("the first frame of a stream connection is not a stream hello")]
    BadHello(#[source] FrameError),
    #[error("host closed a stream connection before its hello")]
    NoHello,
}

/// The host's side, blocking: names the stream on a fresh connection to [`crate::STDIO_PORT`]
/// and waits for the agent to accept it. On `Ok` the connection is the stream.
pub fn attach_stream<S: Read + Write + ?Sized>(
    conn: &mut S,
    process: &ProcessRef,
    stream: StreamKind,
) -> Result<(), StreamError> {
    let frame_err = |source| StreamError::Frame {
        process: process.clone(),
        stream,
        source,
    };
    let hello = StreamHello {
        process: process.clone(),
        stream,
    };
    write_frame(conn, &hello).map_err(frame_err)?;
    let body = read_frame_body(conn, MAX_STREAM_HEADER_SIZE)
        .map_err(frame_err)?
        .ok_or_else(|| StreamError::Closed {
            process: process.clone(),
            stream,
        })?;
    match decode_body::<StreamReply>(&body).map_err(frame_err)? {
        StreamReply::Accepted => Ok(()),
        StreamReply::Rejected(source) => Err(StreamError::Rejected {
            process: process.clone(),
            stream,
            source,
        }),
    }
}

/// The agent's side, blocking: reads the hello of a fresh stream connection. The caller
/// answers with [`write_frame`] of a [`StreamReply`].
pub fn read_stream_hello<S: Read + ?Sized>(conn: &mut S) -> Result<StreamHello, StreamError> {
    let body = read_frame_body(conn, MAX_STREAM_HEADER_SIZE)
        .map_err(StreamError::BadHello)?
        .ok_or(StreamError::NoHello)?;
    decode_body(&body).map_err(StreamError::BadHello)
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    use std::thread;

    use super::*;
    use crate::message::ErrorKind;

    #[test]
    fn stream_hello_layout() {
        let hello = StreamHello {
            process: ProcessRef::Exec("e1".into()),
            stream: StreamKind::Stdout,
        };
        assert_eq!(
            serde_json::to_value(&hello).unwrap(),
            serde_json::json!({"process": {"exec": "e1"}, "stream": "stdout"})
        );
        assert_eq!(
            serde_json::to_value(StreamReply::Accepted).unwrap(),
            serde_json::json!("accepted")
        );
        let rejected = StreamReply::Rejected(ErrorResponse::new(ErrorKind::AlreadyExists, "m"));
        let text = serde_json::to_string(&rejected).unwrap();
        assert_eq!(
            serde_json::from_str::<StreamReply>(&text).unwrap(),
            rejected
        );
    }

    #[test]
    fn attach_then_raw_bytes_both_ways() {
        let (mut host, mut agent) = UnixStream::pair().unwrap();
        let agent_side = thread::spawn(move || {
            let hello = read_stream_hello(&mut agent).unwrap();
            write_frame(&mut agent, &StreamReply::Accepted).unwrap();
            // Raw bytes right after the reply.
            agent.write_all(b"\x00\x00\x00\xffterminal output").unwrap();
            let mut input = [0; 5];
            agent.read_exact(&mut input).unwrap();
            (hello, input)
        });
        attach_stream(&mut host, &ProcessRef::Init, StreamKind::Terminal).unwrap();
        host.write_all(b"ls\r\n\x04").unwrap();
        let mut output = [0; 19];
        host.read_exact(&mut output).unwrap();
        assert_eq!(&output, b"\x00\x00\x00\xffterminal output");
        let (hello, input) = agent_side.join().unwrap();
        assert_eq!(
            hello,
            StreamHello {
                process: ProcessRef::Init,
                stream: StreamKind::Terminal
            }
        );
        assert_eq!(&input, b"ls\r\n\x04");
    }

    #[test]
    fn rejected_stream_names_process_stream_and_cause() {
        let (mut host, mut agent) = UnixStream::pair().unwrap();
        let agent_side = thread::spawn(move || {
            read_stream_hello(&mut agent).unwrap();
            let reply = StreamReply::Rejected(ErrorResponse::new(
                ErrorKind::AlreadyExists,
                "stdin of exec \"e1\" is already attached",
            ));
            write_frame(&mut agent, &reply).unwrap();
        });
        let err = attach_stream(&mut host, &ProcessRef::Exec("e1".into()), StreamKind::Stdin)
            .unwrap_err();
        agent_side.join().unwrap();
        assert_eq!(
            err.to_string(),
            "agent rejected the stdin stream of exec \"e1\""
        );
        let cause = std::error::Error::source(&err).unwrap().to_string();
        assert_eq!(
            cause,
            "already exists: stdin of exec \"e1\" is already attached"
        );
    }

    #[test]
    fn closed_or_garbage_before_the_hello() {
        let (host, mut agent) = UnixStream::pair().unwrap();
        drop(host);
        assert!(matches!(
            read_stream_hello(&mut agent),
            Err(StreamError::NoHello)
        ));

        let (mut host, mut agent) = UnixStream::pair().unwrap();
        // A header over the stream header limit: rejected before the body is read.
        host.write_all(&(MAX_STREAM_HEADER_SIZE + 1).to_le_bytes())
            .unwrap();
        let err = read_stream_hello(&mut agent).unwrap_err();
        assert!(
            matches!(err, StreamError::BadHello(FrameError::TooLarge { .. })),
            "{err:?}"
        );

        let (mut host, mut agent) = UnixStream::pair().unwrap();
        write_frame(&mut host, &serde_json::json!({"process": "init"})).unwrap();
        let err = read_stream_hello(&mut agent).unwrap_err();
        assert!(
            matches!(err, StreamError::BadHello(FrameError::Decode { .. })),
            "{err:?}"
        );
    }

    #[test]
    fn agent_closing_before_the_reply() {
        let (mut host, mut agent) = UnixStream::pair().unwrap();
        let agent_side = thread::spawn(move || {
            read_stream_hello(&mut agent).unwrap();
        });
        let err = attach_stream(&mut host, &ProcessRef::Init, StreamKind::Stdout).unwrap_err();
        agent_side.join().unwrap();
        assert_eq!(
            err.to_string(),
            "agent closed the stdout stream of the init process before answering"
        );
    }
}
