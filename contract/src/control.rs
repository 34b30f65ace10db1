//! The `hull` side of a container's control socket, `<state>/<id>/control.sock`: it speaks the
//! agent's protocol (docs/protocol.md), a handshake and then requests and their responses,
//! which hull-vmm forwards on its one connection to the agent. The agent's refusals come back
//! as [`ControlError::Agent`] with their kind, so a caller can tell "no such process" from a
//! broken connection.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hull_protocol::{
    host_handshake, read_frame, unix_path, write_frame, AgentMessage, ErrorResponse, FrameError,
    HandshakeError, HostMessage, Request, RequestBody, ResponseBody,
};

/// For hull-vmm to answer the handshake.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(30);

/// Why a control request did not get its answer.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot connect to {}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("handshake on {}", path.display())]
    Handshake {
        path: PathBuf,
        #[source]
        source: HandshakeError,
    },
    #[error("control connection")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The agent (or hull-vmm) refused the request; its kind and message, intact.
    #[error("{}", .0.message)]
    Agent(ErrorResponse),
    #[error("the container's hull-vmm closed its control socket")]
    Closed,
}

/// A connection to a container's control socket.
pub struct Client {
    conn: UnixStream,
    next_id: u64,
}

impl Client {
    /// Connects and runs the handshake.
    pub fn connect(path: &Path) -> Result<Self, ControlError> {
        let mut conn = unix_path::connect(path).map_err(|source| ControlError::Connect {
            path: path.to_owned(),
            source,
        })?;
        conn.set_read_timeout(Some(HANDSHAKE_DEADLINE))?;
        host_handshake(&mut conn, env!("CARGO_PKG_VERSION")).map_err(|source| {
            ControlError::Handshake {
                path: path.to_owned(),
                source,
            }
        })?;
        conn.set_read_timeout(None)?;
        Ok(Self { conn, next_id: 1 })
    }

    /// Sends a request and waits for its answer (`timeout`: `None` waits for ever, as `wait`
    /// needs).
    pub fn request(
        &mut self,
        body: RequestBody,
        timeout: Option<Duration>,
    ) -> Result<ResponseBody, ControlError> {
        let id = self.next_id;
        self.next_id += 1;
        write_frame(&mut self.conn, &HostMessage::Request(Request { id, body }))?;
        self.conn.set_read_timeout(timeout)?;
        loop {
            match read_frame::<_, AgentMessage>(&mut self.conn)? {
                Some(AgentMessage::Response(r)) if r.id == id => {
                    return r.result.map_err(ControlError::Agent);
                }
                Some(_) => continue,
                None => return Err(ControlError::Closed),
            }
        }
    }
}
