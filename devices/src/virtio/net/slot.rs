//! A NIC slot: a virtio-mmio device that is a placeholder (device ID 0) until a [`Net`] is put
//! in it, and a virtio-net device from then on.
//!
//! A VM is made with its slots before its network is known: a container's interfaces may
//! appear after `create` (Docker's network setup runs in a prestart hook), and a VM restored
//! from a template was booted before there was any container at all. The guest's virtio-mmio
//! driver probes every device on the command line at boot and leaves a placeholder unbound
//! (`-ENODEV`, no error); once the slot is filled, the guest agent binds the driver to it
//! (`/sys/bus/platform/drivers/virtio-mmio/bind`), which probes it again and finds a NIC.
//!
//! An empty slot has nothing to snapshot, so a template may have slots; a filled one is a
//! [`Net`], which is not snapshotted.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{Net, QUEUE_SIZE};
use crate::virtio::{ActivateError, ActiveQueue, IrqTrigger, QueueProgress, VirtioDevice};

/// A slot, empty or holding a NIC.
pub struct NetSlot {
    net: Option<Net>,
    /// Signalled when a NIC is put in: the event loop then watches what the NIC needs.
    filled_evt: EventFd,
    /// The NIC's descriptors are watched (its `init` ran on the event loop).
    watched: bool,
    queue_max_sizes: [u16; 2],
}

/// Why a slot cannot take a NIC.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("the NIC slot is taken")]
    Taken,
    #[error("cannot wake the event loop for the new NIC")]
    Wake(#[source] std::io::Error),
}

impl NetSlot {
    /// An empty slot.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            net: None,
            filled_evt: EventFd::new(EFD_NONBLOCK)?,
            watched: false,
            queue_max_sizes: [QUEUE_SIZE; 2],
        })
    }

    /// Whether a NIC is in the slot.
    pub fn is_filled(&self) -> bool {
        self.net.is_some()
    }

    /// The NIC in the slot.
    pub fn net(&self) -> Option<&Net> {
        self.net.as_ref()
    }

    /// Puts `net` in the empty slot. The guest sees it at its next probe of the device.
    pub fn fill(&mut self, net: Net) -> Result<(), SlotError> {
        if self.net.is_some() {
            return Err(SlotError::Taken);
        }
        self.net = Some(net);
        self.filled_evt.write(1).map_err(SlotError::Wake)
    }
}

impl VirtioDevice for NetSlot {
    /// 0 while empty: the driver leaves a device of ID 0 alone.
    fn device_type(&self) -> u32 {
        self.net.as_ref().map_or(0, VirtioDevice::device_type)
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    fn avail_features(&self) -> u64 {
        self.net.as_ref().map_or(0, VirtioDevice::avail_features)
    }

    fn ack_features(&mut self, features: u64) {
        if let Some(net) = &mut self.net {
            net.ack_features(features);
        }
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        if let Some(net) = &self.net {
            net.read_config(offset, data);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if let Some(net) = &mut self.net {
            net.write_config(offset, data);
        }
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<IrqTrigger>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        match &mut self.net {
            Some(net) => net.activate(mem, interrupt, queues),
            None => Err(ActivateError::Backend {
                device_type: 0,
                source: "an empty NIC slot cannot be started".into(),
            }),
        }
    }

    fn reset(&mut self) -> bool {
        self.net.as_mut().is_none_or(Net::reset)
    }

    fn snapshot_ready(&self, progress: &[QueueProgress]) -> Result<(), String> {
        match &self.net {
            None => Ok(()),
            Some(net) => net.snapshot_ready(progress),
        }
    }
}

impl MutEventSubscriber for NetSlot {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.filled_evt, EventSet::IN)) {
            log::error!("net slot: cannot watch the fill eventfd: {e:?}");
        }
        self.watch_net(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.filled_evt.as_raw_fd() {
            let _ = self.filled_evt.read();
            self.watch_net(ops);
        } else if let Some(net) = &mut self.net {
            net.process(events, ops);
        }
    }
}

impl NetSlot {
    /// Lets the NIC watch its descriptors, once.
    fn watch_net(&mut self, ops: &mut EventOps) {
        if self.watched {
            return;
        }
        if let Some(net) = &mut self.net {
            net.init(ops);
            self.watched = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::net::fuzz::PairIo;

    fn pair() -> PairIo {
        let (ours, _theirs) = nix::sys::socket::socketpair(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::SeqPacket,
            None,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        PairIo(ours)
    }

    #[test]
    fn an_empty_slot_is_a_placeholder_and_a_filled_one_a_nic() {
        let mut slot = NetSlot::new().unwrap();
        assert_eq!(slot.device_type(), 0);
        assert_eq!(slot.avail_features(), 0);
        assert_eq!(slot.queue_max_sizes(), [QUEUE_SIZE; 2]);
        assert!(slot.snapshot_ready(&[]).is_ok());
        assert!(slot.reset());
        let mut config = [0xffu8; 6];
        slot.read_config(0, &mut config);
        assert_eq!(config, [0xff; 6], "an empty slot has no configuration");

        let mac = [2, 0, 0, 0, 0, 9];
        slot.fill(Net::new(Box::new(pair()), mac, 1500).unwrap())
            .unwrap();
        assert_eq!(slot.device_type(), crate::virtio::TYPE_NET);
        assert_ne!(slot.avail_features(), 0);
        slot.read_config(0, &mut config);
        assert_eq!(config, mac);
        assert!(
            slot.snapshot_ready(&[]).is_err(),
            "a NIC is not snapshotted"
        );
        assert_eq!(
            slot.filled_evt.read().unwrap(),
            1,
            "the event loop is woken"
        );

        let again = slot.fill(Net::new(Box::new(pair()), mac, 1500).unwrap());
        assert!(matches!(again, Err(SlotError::Taken)));
    }
}
