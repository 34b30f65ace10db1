//! Just enough of the i8042 keyboard controller for a guest to reset the machine.
//!
//! The guest kernel is booted with `reboot=k`: to reboot it pulses the CPU reset line by writing
//! command 0xfe to port 0x64, after polling the status register until the input buffer is
//! empty. There is no keyboard and no mouse; the guest kernel carries no i8042 driver.

use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Offset of the command/status port (0x64) from the data port (0x60).
const OFFSET_COMMAND: u64 = 4;
/// Command: pulse the CPU reset line.
const CMD_RESET_CPU: u8 = 0xfe;

/// The controller; signals `reset_evt` when the guest asks for a CPU reset.
pub struct I8042Device {
    reset_evt: EventFd,
}

impl I8042Device {
    /// Creates the controller; `reset_evt` is written when the guest resets the machine.
    pub fn new(reset_evt: EventFd) -> Self {
        Self { reset_evt }
    }
}

impl BusDevice for I8042Device {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty (ready for a command). Data: 0.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == OFFSET_COMMAND && data.first() == Some(&CMD_RESET_CPU) {
            if let Err(err) = self.reset_evt.write(1) {
                log::error!("i8042: cannot signal the reset: {err}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_signals_and_others_do_not() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = I8042Device::new(evt.try_clone().unwrap());
        let mut status = [0xffu8];
        dev.read(OFFSET_COMMAND, &mut status);
        assert_eq!(status, [0]);
        dev.write(0, &[CMD_RESET_CPU]);
        dev.write(OFFSET_COMMAND, &[0xaa]);
        assert!(evt.read().is_err(), "no reset expected yet");
        dev.write(OFFSET_COMMAND, &[CMD_RESET_CPU]);
        assert_eq!(evt.read().unwrap(), 1);
    }
}
