//! The versioned handshake that opens the control connection.
//!
//! The host connects to [`crate::CONTROL_PORT`] and sends [`HostMessage::Hello`] with the range
//! of protocol versions it speaks. The agent answers [`AgentMessage::Hello`] with the version
//! both will use (the highest both speak), or [`AgentMessage::HelloRejected`] naming both ranges
//! and closes the connection. Nothing else may come first on either side.
//!
//! The hello messages themselves, whose layouts are frozen, and the version numbers live in
//! [`crate::hello`]; they are re-exported here under their old paths.

use std::io::{Read, Write};

use crate::frame::{read_frame, write_frame, FrameError};
use crate::message::{AgentMessage, HostMessage};

pub use crate::hello::{
    AgentHello, HelloRejected, HostHello, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};

/// The two sides share no protocol version.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "incompatible protocol versions: host speaks {host_min}..={host_max}, \
     agent speaks {agent_min}..={agent_max}"
)]
pub struct VersionMismatch {
    pub host_min: u32,
    pub host_max: u32,
    pub agent_min: u32,
    pub agent_max: u32,
}

/// Errors of the handshake, on either side.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("handshake failed")]
    Frame(#[from] FrameError),
    #[error("{peer} closed the control connection during the handshake")]
    Closed { peer: &'static str },
    #[error("agent {agent_version} rejected the hello: {message}")]
    Rejected {
        agent_version: String,
        message: String,
    },
    /// The agent chose a version the host does not speak (a broken agent).
    #[error(
        "agent {agent_version} chose protocol version {chosen}, outside the host's {min}..={max}"
    )]
    BadChoice {
        agent_version: String,
        chosen: u32,
        min: u32,
        max: u32,
    },
    /// The host's entropy for the guest could not be read (`/dev/urandom`).
    #[error("cannot read the host's entropy for the guest")]
    Seed(#[source] std::io::Error),
    #[error("expected a hello from the {peer}, got {got}")]
    Unexpected {
        peer: &'static str,
        got: &'static str,
    },
    #[error(transparent)]
    Incompatible(#[from] VersionMismatch),
}

/// The version two sides speaking `host` and `agent` (each `(min, max)`) use: the highest both
/// speak.
pub fn negotiate(host: (u32, u32), agent: (u32, u32)) -> Result<u32, VersionMismatch> {
    let chosen = host.1.min(agent.1);
    if chosen >= host.0.max(agent.0) {
        Ok(chosen)
    } else {
        Err(VersionMismatch {
            host_min: host.0,
            host_max: host.1,
            agent_min: agent.0,
            agent_max: agent.1,
        })
    }
}

/// The agent's answer to a host's hello: [`AgentMessage::Hello`] with the chosen version, or
/// [`AgentMessage::HelloRejected`] with the mismatch.
pub fn answer_hello(hello: &HostHello, agent_version: &str, kernel_release: &str) -> AgentMessage {
    answer_for(agent_hello_version(hello), agent_version, kernel_release)
}

/// The version an agent built with this crate agrees on with `hello`'s host.
fn agent_hello_version(hello: &HostHello) -> Result<u32, VersionMismatch> {
    negotiate(
        (hello.min_protocol_version, hello.protocol_version),
        (MIN_PROTOCOL_VERSION, PROTOCOL_VERSION),
    )
}

fn answer_for(
    agreed: Result<u32, VersionMismatch>,
    agent_version: &str,
    kernel_release: &str,
) -> AgentMessage {
    match agreed {
        Ok(protocol_version) => AgentMessage::Hello(AgentHello {
            protocol_version,
            agent_version: agent_version.to_owned(),
            kernel_release: kernel_release.to_owned(),
        }),
        Err(mismatch) => {
            AgentMessage::HelloRejected(rejection(agent_version, mismatch.to_string()))
        }
    }
}

fn rejection(agent_version: &str, message: String) -> HelloRejected {
    HelloRejected {
        protocol_version: PROTOCOL_VERSION,
        min_protocol_version: MIN_PROTOCOL_VERSION,
        agent_version: agent_version.to_owned(),
        message,
    }
}

/// Checks the agent's answer to `sent`: the agreed hello, or why there is none.
pub fn check_answer(sent: &HostHello, answer: AgentMessage) -> Result<AgentHello, HandshakeError> {
    match answer {
        AgentMessage::Hello(hello) => {
            let (min, max) = (sent.min_protocol_version, sent.protocol_version);
            if (min..=max).contains(&hello.protocol_version) {
                Ok(hello)
            } else {
                Err(HandshakeError::BadChoice {
                    agent_version: hello.agent_version,
                    chosen: hello.protocol_version,
                    min,
                    max,
                })
            }
        }
        AgentMessage::HelloRejected(rejected) => Err(HandshakeError::Rejected {
            agent_version: rejected.agent_version,
            message: rejected.message,
        }),
        AgentMessage::Response(_) => Err(unexpected("agent", "a response")),
        AgentMessage::Event(_) => Err(unexpected("agent", "an event")),
    }
}

fn unexpected(peer: &'static str, got: &'static str) -> HandshakeError {
    HandshakeError::Unexpected { peer, got }
}

/// The host's side, blocking: sends the hello, reads and checks the answer.
pub fn host_handshake<S: Read + Write + ?Sized>(
    stream: &mut S,
    host_version: &str,
) -> Result<AgentHello, HandshakeError> {
    let mut hello = HostHello::new(host_version);
    // Not optional: a guest restored from a template shares its random state with every
    // sibling until it gets the host's entropy.
    hello.seed = Some(crate::hello::Seed::from_host().map_err(HandshakeError::Seed)?);
    write_frame(stream, &HostMessage::Hello(hello.clone()))?;
    let answer =
        read_frame::<_, AgentMessage>(stream)?.ok_or(HandshakeError::Closed { peer: "agent" })?;
    check_answer(&hello, answer)
}

/// The agent's side, blocking: reads the host's hello and answers it. On success returns the
/// host's hello and the agreed version; on a mismatch (or a first frame that is no hello) the
/// rejection has been sent and the caller closes the connection.
pub fn agent_handshake<S: Read + Write + ?Sized>(
    stream: &mut S,
    agent_version: &str,
    kernel_release: &str,
) -> Result<(HostHello, u32), HandshakeError> {
    let first = match read_frame::<_, HostMessage>(stream) {
        Ok(Some(first)) => first,
        Ok(None) => return Err(HandshakeError::Closed { peer: "host" }),
        Err(e @ FrameError::Decode { .. }) => {
            let message = "expected a hello as the first frame, got a malformed message";
            reject(stream, agent_version, message)?;
            return Err(e.into());
        }
        Err(e) => return Err(e.into()),
    };
    let hello = match first {
        HostMessage::Hello(hello) => hello,
        HostMessage::Request(_) => {
            let message = "expected a hello as the first frame, got a request";
            reject(stream, agent_version, message)?;
            return Err(unexpected("host", "a request"));
        }
    };
    let agreed = agent_hello_version(&hello);
    write_frame(
        stream,
        &answer_for(agreed.clone(), agent_version, kernel_release),
    )?;
    Ok((hello, agreed?))
}

fn reject<S: Write + ?Sized>(
    stream: &mut S,
    agent_version: &str,
    message: &str,
) -> Result<(), FrameError> {
    let answer = AgentMessage::HelloRejected(rejection(agent_version, message.to_owned()));
    write_frame(stream, &answer)
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;
    use std::thread;

    use super::*;
    use crate::frame::encode_frame;
    use crate::message::{Request, RequestBody};

    fn host_hello(min: u32, max: u32) -> HostHello {
        HostHello {
            protocol_version: max,
            min_protocol_version: min,
            host_version: "9.9.9".into(),
            seed: None,
        }
    }

    #[test]
    fn negotiate_picks_the_highest_common_version() {
        assert_eq!(negotiate((1, 1), (1, 1)), Ok(1));
        assert_eq!(negotiate((1, 3), (2, 5)), Ok(3));
        assert_eq!(negotiate((2, 5), (1, 3)), Ok(3));
        assert_eq!(negotiate((1, 4), (4, 4)), Ok(4));
        assert!(negotiate((1, 1), (2, 2)).is_err());
        assert!(negotiate((3, 4), (1, 2)).is_err());
        // A nonsense range (min over max) is never compatible.
        assert!(negotiate((2, 1), (1, 2)).is_err());
    }

    #[test]
    fn mismatch_names_both_versions() {
        let err = negotiate((2, 3), (1, 1)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "incompatible protocol versions: host speaks 2..=3, agent speaks 1..=1"
        );
    }

    #[test]
    fn answer_hello_accepts_a_compatible_host() {
        let answer = answer_hello(&HostHello::new("0.1.0"), "0.2.0", "6.12.0");
        assert_eq!(
            answer,
            AgentMessage::Hello(AgentHello {
                protocol_version: PROTOCOL_VERSION,
                agent_version: "0.2.0".into(),
                kernel_release: "6.12.0".into(),
            })
        );
        let hello = check_answer(&HostHello::new("0.1.0"), answer).unwrap();
        assert_eq!(hello.kernel_release, "6.12.0");
    }

    #[test]
    fn answer_hello_rejects_a_newer_host_by_name() {
        let sent = host_hello(PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 2);
        let answer = answer_hello(&sent, "0.2.0", "6.12.0");
        let AgentMessage::HelloRejected(rejected) = &answer else {
            panic!("{answer:?}");
        };
        assert_eq!(
            rejected.message,
            format!(
                "incompatible protocol versions: host speaks {}..={}, agent speaks {}..={}",
                PROTOCOL_VERSION + 1,
                PROTOCOL_VERSION + 2,
                MIN_PROTOCOL_VERSION,
                PROTOCOL_VERSION
            )
        );
        let expected = format!("agent 0.2.0 rejected the hello: {}", rejected.message);
        let err = check_answer(&sent, answer).unwrap_err();
        assert_eq!(err.to_string(), expected);
    }

    #[test]
    fn host_refuses_a_version_it_does_not_speak() {
        let answer = AgentMessage::Hello(AgentHello {
            protocol_version: 7,
            agent_version: "bad".into(),
            kernel_release: "x".into(),
        });
        let err = check_answer(&HostHello::new("h"), answer).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("agent bad chose protocol version 7, outside the host's {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION}")
        );
        let answer = AgentMessage::Response(crate::message::Response {
            id: 0,
            result: Ok(crate::message::ResponseBody::Ok),
        });
        let err = check_answer(&HostHello::new("h"), answer).unwrap_err();
        assert_eq!(
            err.to_string(),
            "expected a hello from the agent, got a response"
        );
    }

    /// The hello layouts are frozen (see the module docs).
    #[test]
    fn hello_layouts_are_frozen() {
        assert_eq!(
            serde_json::to_value(HostMessage::Hello(host_hello(1, 2))).unwrap(),
            serde_json::json!({"hello": {"protocol_version": 2, "min_protocol_version": 1,
                                         "host_version": "9.9.9"}})
        );
        // A future host's hello with more fields still reads.
        let text = r#"{"hello": {"protocol_version": 5, "min_protocol_version": 4,
                       "host_version": "2.0", "features": ["x"]}}"#;
        let HostMessage::Hello(hello) = serde_json::from_str(text).unwrap() else {
            panic!("not a hello");
        };
        assert_eq!(
            hello,
            HostHello {
                protocol_version: 5,
                min_protocol_version: 4,
                host_version: "2.0".into(),
                seed: None,
            }
        );
    }

    #[test]
    fn blocking_handshake_both_sides() {
        let (mut host, mut agent) = UnixStream::pair().unwrap();
        let agent_side = thread::spawn(move || agent_handshake(&mut agent, "0.1.0", "6.12.0"));
        let hello = host_handshake(&mut host, "host-1").unwrap();
        assert_eq!(hello.protocol_version, PROTOCOL_VERSION);
        assert_eq!(hello.agent_version, "0.1.0");
        let (seen, version) = agent_side.join().unwrap().unwrap();
        assert_eq!(seen.host_version, "host-1");
        assert_eq!(version, PROTOCOL_VERSION);
        // The host seeds the guest: fresh entropy each time, and its clock.
        let seed = seen.seed.expect("a seed");
        assert_eq!(seed.entropy.len(), crate::SEED_ENTROPY_BYTES);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        assert!(now - seed.realtime_ns < 10_000_000_000, "{seed:?}");
        assert!(!format!("{seed:?}").contains(&format!("{:?}", seed.entropy)));
        let (mut host, mut agent) = UnixStream::pair().unwrap();
        let agent_side = thread::spawn(move || agent_handshake(&mut agent, "0.1.0", "6.12.0"));
        host_handshake(&mut host, "host-1").unwrap();
        let again = agent_side.join().unwrap().unwrap().0.seed.unwrap();
        assert_ne!(again.entropy, seed.entropy);
    }

    #[test]
    fn agent_rejects_an_incompatible_host_over_the_wire() {
        let (mut host, mut agent) = UnixStream::pair().unwrap();
        let agent_side = thread::spawn(move || agent_handshake(&mut agent, "0.1.0", "6.12.0"));
        write_frame(&mut host, &HostMessage::Hello(host_hello(50, 60))).unwrap();
        let answer = read_frame::<_, AgentMessage>(&mut host).unwrap().unwrap();
        assert!(
            matches!(answer, AgentMessage::HelloRejected(_)),
            "{answer:?}"
        );
        let err = agent_side.join().unwrap().unwrap_err();
        assert!(err.to_string().contains("host speaks 50..=60"), "{err}");
    }

    #[test]
    fn agent_rejects_a_request_or_garbage_before_the_hello() {
        let request = HostMessage::Request(Request {
            id: 1,
            body: RequestBody::StartContainer,
        });
        let garbage = {
            let mut frame = 4u32.to_le_bytes().to_vec();
            frame.extend_from_slice(b"{{{{");
            frame
        };
        for first in [encode_frame(&request).unwrap(), garbage] {
            let (mut host, mut agent) = UnixStream::pair().unwrap();
            let agent_side = thread::spawn(move || agent_handshake(&mut agent, "0.1.0", "6.12.0"));
            host.write_all(&first).unwrap();
            let answer = read_frame::<_, AgentMessage>(&mut host).unwrap().unwrap();
            let AgentMessage::HelloRejected(rejected) = answer else {
                panic!("{answer:?}");
            };
            assert!(rejected
                .message
                .starts_with("expected a hello as the first frame"));
            assert!(agent_side.join().unwrap().is_err());
        }
    }

    #[test]
    fn closed_connection_during_the_handshake() {
        let (mut host, agent) = UnixStream::pair().unwrap();
        drop(agent);
        let err = host_handshake(&mut host, "h").unwrap_err();
        // Either the write or the read notices, depending on timing; both name the failure.
        assert!(
            matches!(
                err,
                HandshakeError::Closed { peer: "agent" } | HandshakeError::Frame(_)
            ),
            "{err:?}"
        );
        let (host, mut agent) = UnixStream::pair().unwrap();
        drop(host);
        let err = agent_handshake(&mut agent, "a", "k").unwrap_err();
        assert_eq!(
            err.to_string(),
            "host closed the control connection during the handshake"
        );
    }
}
