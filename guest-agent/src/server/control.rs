//! The control thread: accepts control connections, one at a time, and passes what the host
//! sends to the owner.
//!
//! For each connection it makes the [`Outbox`] and tells the owner before the handshake's
//! answer goes out (the host may attach streams as soon as it has read it, and the owner must
//! know the connection by then). The handshake itself is written here, directly; the writer
//! thread starts after it, so anything the owner queued meanwhile follows the answer. Then it
//! reads frames and hands each to the owner, waiting until the owner has handled it.
//!
//! A new connection shuts the previous one down, both ways: a writer still blocked on a host
//! that went away without reading wakes up and ends, so at most one such thread lingers.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::mpsc::{self, Sender};

use hull_protocol::{agent_handshake, read_frame_body, MAX_FRAME_SIZE};
use nix::sys::socket::{shutdown, Shutdown};

use super::outbox::Outbox;
use super::{ConnectionId, Event};
use crate::console;
use crate::listener::Listener;

/// Serves control connections one after another. Never returns.
pub fn accept_loop(listener: &Listener, owner: &Sender<Event>) {
    let mut previous: Option<File> = None;
    for n in 0.. {
        let conn = match listener.accept() {
            Ok(conn) => conn,
            Err(e) => {
                console::log(&format!("control: accept failed: {e}"));
                std::thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
        };
        if let Some(old) = previous.take() {
            let _ = shutdown(old.as_raw_fd(), Shutdown::Both);
        }
        previous = conn.try_clone().ok();
        serve(ConnectionId(n), conn, owner);
    }
}

fn serve(id: ConnectionId, mut conn: File, owner: &Sender<Event>) {
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let (outbox, writer) = match Outbox::new(&conn) {
        Ok(v) => v,
        Err(e) => {
            console::log(&format!("control: cannot clone the connection: {e}"));
            return;
        }
    };
    let (handled, each_handled) = mpsc::channel();
    let connected = Event::Connected {
        id,
        outbox,
        handled,
    };
    if owner.send(connected).is_err() {
        return;
    }
    match agent_handshake(&mut conn, env!("CARGO_PKG_VERSION"), &release) {
        Ok((hello, _)) => {
            // Only in the guest: in test mode (the host's tests) the clock and entropy pool are
            // the host's own.
            let in_guest = std::env::var_os(crate::mode::ENV_TEST_ROOT).is_none();
            if let Some(seed) = hello.seed.as_ref().filter(|_| in_guest) {
                if let Err(e) = crate::seed::apply(seed) {
                    console::log(&format!("control: cannot apply the host's seed: {e}"));
                }
            }
        }
        Err(e) => {
            console::log(&format!(
                "control: handshake failed: {}",
                crate::error_chain(&e)
            ));
            let _ = owner.send(Event::Disconnected { id });
            return;
        }
    }
    if let Err(e) = std::thread::Builder::new()
        .name("control-writer".into())
        .spawn(move || writer.run())
    {
        console::log(&format!("control: cannot start the writer thread: {e}"));
        let _ = owner.send(Event::Disconnected { id });
        return;
    }
    loop {
        let body = match read_frame_body(&mut conn, MAX_FRAME_SIZE) {
            Ok(Some(body)) => body,
            Ok(None) => break,
            Err(e) => {
                console::log(&format!("control: {}", crate::error_chain(&e)));
                break;
            }
        };
        if owner.send(Event::Frame { id, body }).is_err() {
            return;
        }
        // The owner answers every frame of the connection it holds; if it let the connection
        // go (a host that stopped reading), the sender is gone and this ends the loop too.
        if each_handled.recv().is_err() {
            break;
        }
    }
    let _ = owner.send(Event::Disconnected { id });
}
