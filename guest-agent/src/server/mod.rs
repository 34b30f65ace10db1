//! Serving the host: the control connection and the stdio streams (docs/protocol.md).
//!
//! One thread owns the server's state; every other thread tells it what happened over one
//! channel of [`Event`]s and never touches the state itself:
//! - **server** (`owner.rs`): the owner. It handles the events one after another: requests,
//!   stream attaches, reaped children, connections that come and go. It forks the container's
//!   processes and waits for their start itself (which the host cannot delay), but it never
//!   writes to a socket: frames for the host go into the connection's [`Outbox`].
//! - **control** (`control.rs`): accepts one control connection at a time, runs the handshake,
//!   then reads frames and passes each to the owner, reading the next only once the owner has
//!   handled it (requests are served one after another, as before, and at most one is queued).
//! - **control-writer** (`outbox.rs`), one per connection: writes what the owner put in the
//!   outbox. Only this thread blocks on a host that does not read.
//! - **stdio** (`stdio.rs`): accepts stream connections, reads each one's hello, asks the owner
//!   whether to take the stream and answers the host.
//! - the **main loop** (`main.rs`) reaps and hands what it reaped to [`Server::reaped`], which
//!   only sends an event: reaping never waits for the owner, let alone for the host.
//! - one **terminal** relay per process with a terminal (`relay.rs`).
//!
//! A panic in any of them powers the VM off (the panic hook in `main.rs`), so no thread is
//! ever left waiting for one that died.
//!
//! A host that stops reading: the writer blocks, the outbox fills up to
//! [`outbox::MAX_QUEUED_BYTES`], and the next frame that does not fit makes the owner close the
//! connection (both directions shut down, the host sees it end) instead of waiting or dropping
//! the frame silently. Memory stays bounded, nothing waits on the host but the writer, and a
//! host that misses a frame learns it from the closed connection rather than waiting forever.
//! The event channel itself is unbounded: its senders are the main loop (one event per reap,
//! which must never block), one control reader (at most one frame in flight) and the stdio
//! thread (one attach in flight).
//!
//! The container's processes (its init and those `exec` added) are tracked by pid from before
//! they can run: each waits for a start byte (`container/mod.rs`), so an exit is never reaped
//! before the owner knows whose it is.

mod control;
mod outbox;
mod owner;
mod stdio;
mod system;

use std::fs::File;
use std::path::PathBuf;
use std::sync::mpsc::{self, Sender};

use hull_protocol::stdio::{StreamHello, StreamReply};

use crate::container::Zygote;
use crate::listener::Listener;
use crate::reaper::Reaped;

pub use outbox::Outbox;

/// Where things are: `/...` in the guest, under the test root on a host.
#[derive(Debug, Clone)]
pub struct Paths {
    /// The agent's root directory.
    pub agent_root: PathBuf,
    /// Its `/proc`.
    pub proc_dir: PathBuf,
    /// Where the container's rootfs is mounted (in the container's mount namespace).
    pub rootfs_dir: PathBuf,
    /// Test mode: a directory bind-mounted instead of the virtio-fs share.
    pub rootfs_override: Option<PathBuf>,
    /// The guest's cgroup v2 root, where the container's cgroup goes (`container/cgroup.rs`);
    /// `None` in test mode, which runs on a host.
    pub cgroup_root: Option<PathBuf>,
}

/// Which control connection an event is about: a connection's events that arrive after the
/// owner has let it go (or taken another) are ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionId(pub u64);

/// What the other threads tell the owner.
#[derive(Debug)]
pub enum Event {
    /// A control connection was accepted and its handshake is under way: frames for the host
    /// go into `outbox` from now on (its writer starts once the handshake's answer is out, so
    /// they follow it). The owner sends `()` on `handled` after each of its frames.
    Connected {
        id: ConnectionId,
        outbox: Outbox,
        handled: Sender<()>,
    },
    /// A frame the host sent after the handshake, not yet decoded.
    Frame { id: ConnectionId, body: Vec<u8> },
    /// The handshake failed or the host closed the connection.
    Disconnected { id: ConnectionId },
    /// A stream connection's hello; the owner answers on `reply` and keeps `stream` if it
    /// accepts it.
    Attach {
        hello: StreamHello,
        stream: File,
        reply: Sender<StreamReply>,
    },
    /// Children the main loop reaped.
    Reaped(Vec<Reaped>),
}

/// The running server: a way to send the owner events.
#[derive(Debug, Clone)]
pub struct Server {
    events: Sender<Event>,
}

impl Server {
    /// Starts the owner, the control and the stdio threads, on listeners that are already
    /// listening.
    pub fn start(
        paths: Paths,
        zygote: Option<Zygote>,
        control: Listener,
        stdio: Listener,
    ) -> std::io::Result<Self> {
        let (events, inbox) = mpsc::channel();
        let system = system::RealSystem::new(paths.clone(), zygote);
        let owner = owner::Owner::new(paths, system);
        std::thread::Builder::new()
            .name("server".into())
            .spawn(move || owner.run(inbox))?;
        let to_owner = events.clone();
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || control::accept_loop(&control, &to_owner))?;
        let to_owner = events.clone();
        std::thread::Builder::new()
            .name("stdio".into())
            .spawn(move || stdio::accept_loop(&stdio, &to_owner))?;
        Ok(Self { events })
    }

    /// Called by the main loop with every child it reaped. Never blocks.
    pub fn reaped(&self, reaped: &[Reaped]) {
        if reaped.is_empty() {
            return;
        }
        // The owner runs as long as the agent does (a panic powers the VM off), so the channel
        // is never closed while anyone calls this.
        let _ = self.events.send(Event::Reaped(reaped.to_vec()));
    }
}
