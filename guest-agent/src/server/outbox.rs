//! The frames waiting for the host on one control connection, and the thread that writes them.
//!
//! The owner puts frames in the [`Outbox`] and never blocks: only the connection's writer
//! thread ([`Writer::run`]) waits on the socket. The outbox holds at most [`MAX_QUEUED_BYTES`]
//! (or one frame, however large): a frame that does not fit means the host has stopped reading,
//! and [`Outbox::send`] says so instead of queueing it; the owner then closes the connection
//! ([`Outbox::close`]), which also wakes a writer blocked on it.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::time::Duration;

use hull_protocol::{encode_frame, AgentMessage, FrameError};
use nix::sys::socket::{shutdown, Shutdown};

use crate::console;

/// The most bytes of frames the host may leave unread (beyond what the socket buffers) before
/// the agent gives up on it. Responses and events are a few hundred bytes; a process list of
/// a big container is the largest frame.
pub const MAX_QUEUED_BYTES: usize = 1 << 20;

/// Why a frame was not queued.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("cannot encode a frame")]
    Encode(#[source] FrameError),
    #[error("the host has not read {queued} bytes of frames; another {len} would exceed {MAX_QUEUED_BYTES}")]
    Full { queued: usize, len: usize },
    #[error("the connection's writer has ended")]
    WriterGone,
}

#[derive(Debug)]
enum Item {
    Frame(Vec<u8>),
    /// Answered once everything queued before it is written.
    Flush(Sender<()>),
}

/// The owner's side: where frames for the host go.
#[derive(Debug)]
pub struct Outbox {
    items: Sender<Item>,
    queued: Arc<AtomicUsize>,
    /// The connection, to shut it down.
    conn: File,
}

/// The writer thread's side.
#[derive(Debug)]
pub struct Writer {
    items: Receiver<Item>,
    queued: Arc<AtomicUsize>,
    conn: File,
}

impl Outbox {
    /// An outbox for `conn` and the writer that empties it (not yet running).
    pub fn new(conn: &File) -> std::io::Result<(Self, Writer)> {
        let (items, receiver) = mpsc::channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let outbox = Self {
            items,
            queued: queued.clone(),
            conn: conn.try_clone()?,
        };
        let writer = Writer {
            items: receiver,
            queued,
            conn: conn.try_clone()?,
        };
        Ok((outbox, writer))
    }

    /// Queues `msg` as one frame, unless the host has left too much unread.
    pub fn send(&self, msg: &AgentMessage) -> Result<(), OutboxError> {
        let frame = encode_frame(msg).map_err(OutboxError::Encode)?;
        let len = frame.len();
        // Only the owner adds, so what it reads here can only shrink before the add below.
        let queued = self.queued.load(Ordering::Acquire);
        if queued > 0 && queued + len > MAX_QUEUED_BYTES {
            return Err(OutboxError::Full { queued, len });
        }
        self.queued.fetch_add(len, Ordering::AcqRel);
        self.items
            .send(Item::Frame(frame))
            .map_err(|_| OutboxError::WriterGone)
    }

    /// Waits until what is queued now is written, for at most `timeout`. False if it was not.
    pub fn flush(&self, timeout: Duration) -> bool {
        let (done, written) = mpsc::channel();
        self.items.send(Item::Flush(done)).is_ok() && written.recv_timeout(timeout).is_ok()
    }

    /// Shuts the connection down both ways: the host sees it end, and the reader and a writer
    /// blocked on it wake up.
    pub fn close(&self) {
        let _ = shutdown(self.conn.as_raw_fd(), Shutdown::Both);
    }
}

impl Writer {
    /// Writes frames as they come until the outbox is dropped and empty, or a write fails (then
    /// the connection is shut down, so the reader sees its end too).
    pub fn run(mut self) {
        while let Ok(item) = self.items.recv() {
            match item {
                Item::Frame(frame) => {
                    let written = self.conn.write_all(&frame);
                    self.queued.fetch_sub(frame.len(), Ordering::AcqRel);
                    if let Err(e) = written {
                        console::log(&format!("control connection: cannot send: {e}"));
                        let _ = shutdown(self.conn.as_raw_fd(), Shutdown::Both);
                        return;
                    }
                }
                Item::Flush(done) => {
                    let _ = done.send(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixStream;

    use hull_protocol::{read_frame, Event, ExitStatus, ProcessRef};

    use super::*;

    fn pair() -> (UnixStream, File) {
        let (host, agent) = UnixStream::pair().unwrap();
        host.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        (host, File::from(OwnedFd::from(agent)))
    }

    fn event(pid: i32) -> AgentMessage {
        AgentMessage::Event(Event::Exited {
            process: ProcessRef::Init,
            pid,
            status: ExitStatus::Code(0),
        })
    }

    #[test]
    fn frames_are_written_in_order_and_flush_waits_for_them() {
        let (mut host, conn) = pair();
        let (outbox, writer) = Outbox::new(&conn).unwrap();
        // Queued before the writer runs (the handshake is still going on): kept, in order.
        outbox.send(&event(1)).unwrap();
        let writer = std::thread::spawn(move || writer.run());
        outbox.send(&event(2)).unwrap();
        assert!(outbox.flush(Duration::from_secs(10)));
        for pid in [1, 2] {
            let msg = read_frame::<_, AgentMessage>(&mut host).unwrap().unwrap();
            assert_eq!(msg, event(pid));
        }
        // Dropping the outbox ends the writer.
        drop(outbox);
        writer.join().unwrap();
    }

    #[test]
    fn a_host_that_stops_reading_fills_the_outbox_and_close_wakes_the_writer() {
        let (mut host, conn) = pair();
        let (outbox, writer) = Outbox::new(&conn).unwrap();
        let writer = std::thread::spawn(move || writer.run());
        // Nobody reads: the socket buffer fills, the writer blocks, then the outbox fills.
        let mut sent = 0usize;
        let err = loop {
            match outbox.send(&event(7)) {
                Ok(()) => sent += 1,
                Err(e) => break e,
            }
            assert!(sent < 1_000_000, "the outbox never filled");
        };
        assert!(matches!(err, OutboxError::Full { .. }), "{err:?}");
        assert!(!outbox.flush(Duration::from_millis(10)));
        outbox.close();
        writer.join().unwrap();
        // What was written before is intact; then the connection ends.
        let first = read_frame::<_, AgentMessage>(&mut host).unwrap().unwrap();
        assert_eq!(first, event(7));
        let mut rest = Vec::new();
        let _ = host.read_to_end(&mut rest);
    }

    #[test]
    fn a_frame_larger_than_the_limit_still_goes_when_nothing_is_queued() {
        let (mut host, conn) = pair();
        let (outbox, writer) = Outbox::new(&conn).unwrap();
        let big = AgentMessage::Response(hull_protocol::Response {
            id: 1,
            result: Err(hull_protocol::ErrorResponse::new(
                hull_protocol::ErrorKind::Internal,
                "x".repeat(MAX_QUEUED_BYTES + 1),
            )),
        });
        outbox.send(&big).unwrap();
        let writer = std::thread::spawn(move || writer.run());
        assert_eq!(
            read_frame::<_, AgentMessage>(&mut host).unwrap().unwrap(),
            big
        );
        drop(outbox);
        writer.join().unwrap();
    }
}
