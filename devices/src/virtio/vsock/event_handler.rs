//! The vsock device in the VMM thread's event loop.
//!
//! The VMM adds the device as a subscriber at build time. `init` watches three fds that live as
//! long as the device: the wake eventfd, the listening socket and the connect timer. Everything else comes and goes
//! (queue notify eventfds with activation and reset, a socket per host client and connection),
//! so the device keeps an [`FdWatch`]: code anywhere in the device records what each fd should
//! be watched for, and `process` brings epoll in line at the end of each call. `activate` and
//! `reset` run on a vCPU thread without access to the event loop; they record their changes and
//! signal the wake eventfd, whose event is what gets the changes applied.
//!
//! Closed fds wait in the watch's graveyard until they are unregistered: closing first would
//! leave epoll watching a file under a number the next socket may get.

use std::collections::HashMap;
use std::fmt;
use std::os::fd::{AsRawFd, RawFd};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::Vsock;

/// What the device wants epoll to watch, and what epoll watches now.
#[derive(Default)]
pub struct FdWatch {
    desired: HashMap<RawFd, EventSet>,
    registered: HashMap<RawFd, EventSet>,
    dirty: Vec<RawFd>,
    graveyard: Vec<Box<dyn AsRawFd + Send>>,
}

impl fmt::Debug for FdWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FdWatch")
            .field("desired", &self.desired)
            .field("registered", &self.registered)
            .field("dirty", &self.dirty)
            .field("graveyard", &self.graveyard.len())
            .finish()
    }
}

impl FdWatch {
    /// Watch `fd` for `interest` (an empty set still reports hang-ups and errors), or stop
    /// watching it (`None`).
    pub fn set(&mut self, fd: RawFd, interest: Option<EventSet>) {
        match interest {
            Some(set) => self.desired.insert(fd, set),
            None => self.desired.remove(&fd),
        };
        self.dirty.push(fd);
    }

    /// Keeps a closed file open until the next `apply` has unregistered it.
    pub fn retire(&mut self, file: impl AsRawFd + Send + 'static) {
        self.graveyard.push(Box::new(file));
    }

    /// How many fds epoll watches for us (after the last `apply`).
    #[cfg(test)]
    pub fn registered_count(&self) -> usize {
        self.registered.len()
    }

    /// Brings epoll in line with what was asked for, then closes the retired files.
    pub fn apply(&mut self, ops: &mut EventOps) {
        for fd in std::mem::take(&mut self.dirty) {
            let want = self.desired.get(&fd).copied();
            let have = self.registered.get(&fd).copied();
            let result = match (have, want) {
                (None, Some(set)) => ops.add(Events::new_raw(fd, set)),
                (Some(old), Some(set)) if old != set => ops.modify(Events::new_raw(fd, set)),
                (Some(old), None) => ops.remove(Events::new_raw(fd, old)),
                _ => Ok(()),
            };
            match result {
                Ok(()) => match want {
                    Some(set) => {
                        self.registered.insert(fd, set);
                    }
                    None => {
                        self.registered.remove(&fd);
                    }
                },
                Err(e) => log::error!("vsock: cannot update the event loop for fd {fd}: {e:?}"),
            }
        }
        self.graveyard.clear();
    }
}

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        for (what, fd) in [
            ("wake eventfd", self.wake_evt.as_raw_fd()),
            ("listening socket", self.muxer.listener().as_raw_fd()),
            ("connect timer", self.muxer.timer().as_raw_fd()),
        ] {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                log::error!("vsock: cannot watch the {what}: {e:?}");
            }
        }
        self.watch.apply(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        let (rx_evt, tx_evt) = match &self.active {
            Some(active) => (active.rx_evt.as_raw_fd(), active.tx_evt.as_raw_fd()),
            None => (-1, -1),
        };
        if fd == self.wake_evt.as_raw_fd() {
            // Activation or reset: its changes to the watch are applied below.
            let _ = self.wake_evt.read();
        } else if fd == self.muxer.listener().as_raw_fd() {
            self.muxer.accept(&mut self.watch);
        } else if fd == self.muxer.timer().as_raw_fd() {
            self.muxer.on_timer(&mut self.watch);
        } else if fd == rx_evt {
            // New rx buffers: filled below.
            if let Some(active) = &self.active {
                let _ = active.rx_evt.read();
            }
        } else if fd == tx_evt {
            if let Some(active) = &self.active {
                let _ = active.tx_evt.read();
            }
            self.process_tx();
        } else if self.muxer.owns(fd) {
            let active = self.active.is_some();
            self.muxer
                .on_socket_event(fd, events.event_set(), active, &mut self.watch);
        } else {
            // An fd retired since epoll reported it; unregistered below.
            log::debug!("vsock: event on retired fd {fd}");
        }
        self.process_rx();
        self.watch.apply(ops);
    }
}
