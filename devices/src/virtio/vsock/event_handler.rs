//! The vsock device in the VMM thread's event loop.
//!
//! The VMM adds the device as a subscriber at build time. `init` watches two fds that live as
//! long as the device: the wake eventfd and the connect timer. Everything else comes and goes
//! (the listening socket too, which the muxer leaves out while `accept` keeps failing): the device records what each should be watched for in its
//! [`FdWatch`](super::fd_watch::FdWatch), and `process` brings epoll in line at the end of each
//! call. `activate` and `reset` run on a vCPU thread without access to the event loop; they
//! record their changes and signal the wake eventfd, whose event is what gets the changes
//! applied.

use std::os::fd::AsRawFd;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::Vsock;

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        for (what, fd) in [
            ("wake eventfd", self.wake_evt.as_raw_fd()),
            ("connect timer", self.muxer.timer().as_raw_fd()),
        ] {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                log::error!("vsock: cannot watch the {what}: {e:?}");
            }
        }
        // In the watch: the muxer leaves it out for a while when `accept` keeps failing.
        self.watch
            .set(self.muxer.listener().as_raw_fd(), Some(EventSet::IN));
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
