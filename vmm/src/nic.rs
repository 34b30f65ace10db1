//! The VM's NIC slots (`VmConfig::nic_slots`) and how they are filled: the container's
//! interfaces are mirrored onto TAPs of hull-vmm's network namespace by `hull`, which asks for
//! each to be put in a slot; the guest agent then binds the slot's device
//! (`devices::virtio::net::NetSlot` explains the placeholder).
//!
//! A TAP made by `hull` is persistent and owned by hull-vmm's user, so hull-vmm attaches to it
//! by name without `CAP_NET_ADMIN`, from its jail (which has `/dev/net/tun`).

use std::sync::{Arc, Mutex};

use devices::virtio::net::{Net, NetSlot, Tap};

/// One slot and the name of its device in the guest.
struct Slot {
    device: Arc<Mutex<NetSlot>>,
    /// `virtio-mmio.N`: the platform device the guest made of the slot's command-line entry.
    guest_device: String,
}

/// The VM's NIC slots; clones share them.
#[derive(Clone, Default)]
pub struct NicSlots(Arc<Vec<Slot>>);

/// Why a NIC could not be put in a slot.
#[derive(Debug, thiserror::Error)]
pub enum NicError {
    #[error("TAP {tap}: every NIC slot of the VM is taken ({slots})")]
    Full { tap: String, slots: usize },
    #[error("TAP {tap}: MAC {mac:?} is not one a NIC takes")]
    Mac { tap: String, mac: String },
    #[error("TAP {tap}")]
    Tap {
        tap: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl NicSlots {
    /// Slots made by the builder, each with its guest device.
    pub(crate) fn new(slots: Vec<(Arc<Mutex<NetSlot>>, String)>) -> Self {
        Self(Arc::new(
            slots
                .into_iter()
                .map(|(device, guest_device)| Slot {
                    device,
                    guest_device,
                })
                .collect(),
        ))
    }

    /// How many slots the VM has.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the VM has none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Opens the TAP `tap` and puts a NIC with `mac` and `mtu` on it in the first empty slot;
    /// returns the slot's guest device.
    pub fn fill(&self, tap: &str, mac: &str, mtu: u16) -> Result<String, NicError> {
        let mac_bytes = hull_protocol::parse_mac(mac).ok_or_else(|| NicError::Mac {
            tap: tap.to_owned(),
            mac: mac.to_owned(),
        })?;
        let tap_err = |source: Box<dyn std::error::Error + Send + Sync>| NicError::Tap {
            tap: tap.to_owned(),
            source,
        };
        let slot = self
            .0
            .iter()
            .find(|slot| !lock(&slot.device).is_filled())
            .ok_or_else(|| NicError::Full {
                tap: tap.to_owned(),
                slots: self.0.len(),
            })?;
        let opened = Tap::open(tap).map_err(|e| tap_err(Box::new(e)))?;
        let net = Net::new(Box::new(opened), mac_bytes, mtu).map_err(|e| tap_err(Box::new(e)))?;
        lock(&slot.device)
            .fill(net)
            .map_err(|e| tap_err(Box::new(e)))?;
        log::info!(
            "NIC slot {}: TAP {tap}, MAC {mac}, MTU {mtu}",
            slot.guest_device
        );
        Ok(slot.guest_device.clone())
    }
}

fn lock(slot: &Mutex<NetSlot>) -> std::sync::MutexGuard<'_, NetSlot> {
    slot.lock().unwrap_or_else(|p| p.into_inner())
}
