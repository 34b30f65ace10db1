//! What the device wants epoll to watch, kept apart from epoll itself.
//!
//! The fds the device watches come and go (queue notify eventfds with activation and reset, a
//! socket per host client and connection), and they change in code that has no access to the
//! event loop: the muxer, and `activate`/`reset` on a vCPU thread. So that code records in an
//! [`FdWatch`] what each fd should be watched for, and the event handler brings epoll in line
//! with [`FdWatch::apply`] at the end of each `process`. A module of its own because the device,
//! the muxer and the event handler all use it: it depends on none of them.
//!
//! Closed fds wait in the watch's graveyard until they are unregistered: closing first would
//! leave epoll watching a file under a number the next socket may get.

use std::collections::HashMap;
use std::fmt;
use std::os::fd::{AsRawFd, RawFd};

use event_manager::{EventOps, EventSet, Events};

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

    /// What `fd` is to be watched for (before the next `apply`).
    #[cfg(test)]
    pub fn wants(&self, fd: RawFd) -> Option<EventSet> {
        self.desired.get(&fd).copied()
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
