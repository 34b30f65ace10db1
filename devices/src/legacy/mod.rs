//! Legacy port-I/O devices of a PC that a Linux guest expects: the 16550 serial port for the
//! console and just enough of the i8042 controller for the guest to reset the machine.

mod i8042;
mod serial;

pub use i8042::I8042Device;
pub use serial::{EventFdTrigger, SerialDevice};

/// Base port of the first serial port (COM1, `ttyS0`).
pub const SERIAL_PORT_BASE: u64 = 0x3f8;
/// Number of ports a 16550 decodes.
pub const SERIAL_PORT_LEN: u64 = 8;
/// Legacy interrupt line of COM1.
pub const SERIAL_IRQ: u32 = 4;
/// First port of the i8042: 0x60 is data, 0x64 command and status.
pub const I8042_PORT_BASE: u64 = 0x60;
/// Ports 0x60 through 0x64; 0x61 (the speaker gate) is answered by KVM's in-kernel PIT.
pub const I8042_PORT_LEN: u64 = 5;
