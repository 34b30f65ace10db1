//! The console: a 16550 UART (vm-superio) whose interrupt is an eventfd the VMM registers as an
//! irqfd, and whose output goes to any writer (the VMM's stdout, a log file, or nowhere).

use std::io::{self, Write};

use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Raises a legacy interrupt by writing to an eventfd that KVM turns into an interrupt.
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// Wraps `evt`; the VMM registers a clone of it as the irqfd for the device's line.
    pub fn new(evt: EventFd) -> Self {
        Self(evt)
    }
}

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// COM1 as seen on the port-I/O bus.
pub struct SerialDevice {
    serial: Serial<EventFdTrigger, NoEvents, Box<dyn Write + Send>>,
}

impl SerialDevice {
    /// Creates a UART that raises `interrupt` and writes the guest's output to `out`.
    pub fn new(interrupt: EventFd, out: Box<dyn Write + Send>) -> Self {
        Self {
            serial: Serial::new(EventFdTrigger::new(interrupt), out),
        }
    }

    /// Queues bytes for the guest to read, as if typed on the console.
    /// A port restored to `state` (a snapshot's); fails if its FIFO holds more than a 16550's.
    pub fn from_state(
        interrupt: EventFd,
        out: Box<dyn Write + Send>,
        state: &SerialState,
    ) -> Result<Self, vm_superio::serial::Error<io::Error>> {
        Ok(Self {
            serial: Serial::from_state(state, EventFdTrigger::new(interrupt), NoEvents, out)?,
        })
    }

    /// The registers and the input FIFO, for a snapshot.
    pub fn state(&self) -> SerialState {
        self.serial.state()
    }

    pub fn enqueue_input(
        &mut self,
        input: &[u8],
    ) -> Result<(), vm_superio::serial::Error<io::Error>> {
        self.serial.enqueue_raw_bytes(input).map(|_| ())
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // The UART's registers are bytes; wider accesses are not decoded by real hardware.
        match (u8::try_from(offset), data) {
            (Ok(offset), [byte]) => *byte = self.serial.read(offset),
            (_, data) => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            // A failed write to the console sink (a closed pipe, say) must not stop the guest:
            // the output is lost, as on a disconnected serial line.
            if let Err(err) = self.serial.write(offset, *byte) {
                log::debug!("serial output lost: {err:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn guest_output_reaches_the_sink_and_raises_the_interrupt() {
        let sink = Sink::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(irq.try_clone().unwrap(), Box::new(sink.clone()));
        // Enable the transmitter-empty interrupt (IER bit 1), then send two bytes.
        dev.write(1, &[0x02]);
        dev.write(0, b"h");
        dev.write(0, b"i");
        assert_eq!(&*sink.0.lock().unwrap(), b"hi");
        assert!(irq.read().unwrap() >= 1);
    }

    #[test]
    fn input_is_readable_and_odd_accesses_are_ignored() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(irq, Box::new(io::sink()));
        dev.enqueue_input(b"x").unwrap();
        let mut byte = [0u8];
        dev.read(0, &mut byte);
        assert_eq!(byte, *b"x");
        let mut wide = [0u8; 4];
        dev.read(0, &mut wide);
        assert_eq!(wide, [0xff; 4]);
        dev.write(0, &[1, 2]);
        dev.write(u64::MAX, &[1]);
    }
}
