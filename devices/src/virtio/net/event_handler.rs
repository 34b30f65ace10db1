//! The net device in the VMM thread's event loop.
//!
//! `init` watches what lives as long as the device: the wake eventfd, and the TAP,
//! edge-triggered for input and output (the device reads the TAP until it is empty or the guest
//! has no room, and writes until it is full; an edge brings it back). The queue eventfds come
//! with `activate` and go with `reset`, which run on a vCPU thread: they signal the wake
//! eventfd, and its event is where the registrations are brought in line.

use std::os::fd::AsRawFd;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::Net;

impl Net {
    /// Unregisters the eventfds of a reset device and registers those of an active one.
    fn sync_registrations(&mut self, ops: &mut EventOps) {
        for evt in self.retired.drain(..) {
            if let Err(e) = ops.remove(Events::new_raw(evt.as_raw_fd(), EventSet::IN)) {
                log::error!("net: cannot stop watching a queue eventfd: {e:?}");
            }
        }
        if self.registered {
            return;
        }
        if let Some(active) = &self.active {
            for (what, evt) in [("receive", &active.rx_evt), ("transmit", &active.tx_evt)] {
                if let Err(e) = ops.add(Events::new_raw(evt.as_raw_fd(), EventSet::IN)) {
                    log::error!("net: cannot watch the {what} queue: {e:?}");
                }
            }
            self.registered = true;
        }
    }
}

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new_raw(self.wake_evt.as_raw_fd(), EventSet::IN)) {
            log::error!("net: cannot watch the wake eventfd: {e:?}");
        }
        let tap = EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED;
        if let Err(e) = ops.add(Events::new_raw(self.tap().as_raw_fd(), tap)) {
            log::error!("net: cannot watch the TAP: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        let (rx_evt, tx_evt) = match &self.active {
            Some(active) => (active.rx_evt.as_raw_fd(), active.tx_evt.as_raw_fd()),
            None => (-1, -1),
        };
        if fd == self.wake_evt.as_raw_fd() {
            let _ = self.wake_evt.read();
            self.sync_registrations(ops);
            self.process_tx();
        } else if fd == self.tap().as_raw_fd() {
            if events.event_set().contains(EventSet::OUT) && self.tx_blocked {
                self.tx_blocked = false;
                self.process_tx();
            }
        } else if fd == tx_evt {
            if let Some(active) = &self.active {
                let _ = active.tx_evt.read();
            }
            self.process_tx();
        } else if fd == rx_evt {
            // New receive buffers: filled below.
            if let Some(active) = &self.active {
                let _ = active.rx_evt.read();
            }
        } else {
            log::debug!("net: event on retired fd {fd}");
        }
        self.process_rx();
    }
}
