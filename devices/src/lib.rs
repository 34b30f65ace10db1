//! Device models for hull-vmm.
//!
//! Nothing here touches KVM: the VMM registers ioeventfds and irqfds on a device's behalf, and a
//! device only sees guest memory, its queues, and eventfds it signals for interrupts. That keeps
//! every device testable (and fuzzable) without `/dev/kvm`.

pub mod bus;
pub mod legacy;
pub mod spawn;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};
pub use spawn::{DeviceThread, StdSpawner, ThreadSpawner};
