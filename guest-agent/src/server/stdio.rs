//! The stdio thread: accepts stream connections, reads each one's hello and lets the owner
//! decide whether to take the stream (docs/protocol.md, "Stdio streams").

use std::sync::mpsc::{self, Sender};

use hull_protocol::stdio::StreamReply;
use hull_protocol::{read_stream_hello, write_frame, ErrorKind, ErrorResponse};

use super::Event;
use crate::console;
use crate::listener::Listener;

/// Serves stream connections one after another. Never returns.
pub fn accept_loop(listener: &Listener, owner: &Sender<Event>) {
    loop {
        let mut conn = match listener.accept() {
            Ok(conn) => conn,
            Err(e) => {
                console::log(&format!("stdio: accept failed: {e}"));
                std::thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
        };
        let hello = match read_stream_hello(&mut conn) {
            Ok(hello) => hello,
            Err(e) => {
                console::log(&format!("stdio: {}", crate::error_chain(&e)));
                continue;
            }
        };
        let reply = match conn.try_clone() {
            Ok(stream) => {
                let (reply, answer) = mpsc::channel();
                let attach = Event::Attach {
                    hello,
                    stream,
                    reply,
                };
                match owner.send(attach).ok().and_then(|()| answer.recv().ok()) {
                    Some(reply) => reply,
                    None => StreamReply::Rejected(ErrorResponse::new(
                        ErrorKind::Internal,
                        "the agent's server has stopped",
                    )),
                }
            }
            Err(e) => StreamReply::Rejected(ErrorResponse::new(ErrorKind::Io, e.to_string())),
        };
        if let Err(e) = write_frame(&mut conn, &reply) {
            console::log(&format!("stdio: cannot answer a stream hello: {e}"));
        }
    }
}
