//! Signal forwarding, in one place with one owner: the signals `hull` receives while it stands
//! for a container (`create` and `run` until hull-vmm exists and while it runs, `exec` while
//! its process runs) go where they belong.
//!
//! The forwarded set (hull-vmm's) is blocked in every thread before any other thread starts
//! (threads inherit the mask; children get an empty one, std resets it before exec). One
//! thread takes them with `sigwait`, so nothing runs in a signal handler, and sends them to the
//! owner thread, which alone knows the target: the commands that need one tell it over the
//! same channel. A signal that arrives before there is a target is kept (the last one) and
//! delivered as soon as there is one, so that a signal during `create` ends the VM and
//! `create` cleans up, rather than hull dying with the state half made.

use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::time::Duration;

use hull_protocol::{ProcessRef, RequestBody};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// For a signal request to the guest to be answered.
const REQUEST_DEADLINE: Duration = Duration::from_secs(120);

/// Where the signals go.
#[derive(Debug, Clone)]
pub enum Target {
    /// The hull-vmm this command started (it forwards them to the container's init, or ends
    /// the VM if the container does not exist yet). `SIGWINCH` instead resizes the terminal
    /// `hull run` relays, if there is one (`tty`).
    Vmm(i32),
    /// A process in the guest, through hull-vmm's control socket (`hull exec`).
    Process {
        control_socket: PathBuf,
        process: ProcessRef,
    },
}

enum Event {
    Signal(i32),
    Target(Target),
    /// Asks whether a signal arrived while there was no target.
    Pending(Sender<Option<i32>>),
}

/// The handle the commands hold; the owner thread ends with the process.
pub struct Forwarder {
    events: Sender<Event>,
}

impl Forwarder {
    /// Blocks the forwarded signals and starts taking them. Call before starting any other
    /// thread.
    pub fn start() -> std::io::Result<Self> {
        let set = hull_contract::signals::block_forwarded_signals()?;
        let (events, received) = channel();
        let signals = events.clone();
        std::thread::Builder::new()
            .name("sigwait".into())
            .spawn(move || loop {
                match set.wait() {
                    Ok(signal) => {
                        log::debug!("received {signal}");
                        if signals.send(Event::Signal(signal as i32)).is_err() {
                            break;
                        }
                    }
                    Err(err) => {
                        log::warn!("sigwait failed: {err}");
                        break;
                    }
                }
            })?;
        std::thread::Builder::new()
            .name("forward".into())
            .spawn(move || own(&received))?;
        Ok(Self { events })
    }

    /// From now on signals go to `target`; one that came before goes there now.
    pub fn set_target(&self, target: Target) {
        // The owner only ends with the process.
        let _ = self.events.send(Event::Target(target));
    }

    /// A signal that arrived while there was no target, if any.
    pub fn interrupted(&self) -> Option<i32> {
        let (reply, answer) = channel();
        self.events.send(Event::Pending(reply)).ok()?;
        answer.recv().ok().flatten()
    }
}

/// The owner: the target and a signal waiting for one.
fn own(events: &Receiver<Event>) {
    let mut target: Option<Target> = None;
    let mut pending: Option<i32> = None;
    while let Ok(event) = events.recv() {
        match event {
            Event::Signal(signal) => match &target {
                Some(target) => deliver(target, signal),
                None => pending = Some(signal),
            },
            Event::Target(new) => {
                if let Some(signal) = pending.take() {
                    log::debug!("signal {signal} arrived before its target existed; passing it on");
                    deliver(&new, signal);
                }
                target = Some(new);
            }
            Event::Pending(reply) => {
                let _ = reply.send(if target.is_none() { pending } else { None });
            }
        }
    }
}

fn deliver(target: &Target, signal: i32) {
    match target {
        Target::Vmm(_) if signal == libc::SIGWINCH => crate::tty::resize(),
        Target::Vmm(pid) => {
            if let Err(err) = kill(Pid::from_raw(*pid), Signal::try_from(signal).ok()) {
                log::debug!("cannot pass signal {signal} to hull-vmm {pid}: {err}");
            }
        }
        Target::Process {
            control_socket,
            process,
        } => {
            let body = RequestBody::Signal {
                process: process.clone(),
                signal,
                all: false,
            };
            if let Err(err) = hull_contract::control::Client::connect(control_socket)
                .and_then(|mut c| c.request(body, Some(REQUEST_DEADLINE)))
            {
                log::warn!("cannot forward signal {signal}: {err:#}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;
    use std::process::Command;

    use super::*;

    #[test]
    fn a_signal_before_the_target_reaches_it_once_there_is_one() {
        // The owner alone, without the process-wide signal mask: events stand in for signals.
        let (events, received) = channel();
        std::thread::spawn(move || own(&received));
        let forwarder = Forwarder { events };
        // Stands in for hull-vmm.
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        assert_eq!(forwarder.interrupted(), None);
        forwarder.events.send(Event::Signal(libc::SIGTERM)).unwrap();
        assert_eq!(forwarder.interrupted(), Some(libc::SIGTERM));
        forwarder.set_target(Target::Vmm(child.id() as i32));
        assert_eq!(forwarder.interrupted(), None);
        assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGTERM));
    }

    #[test]
    fn signals_after_the_target_go_straight_to_it() {
        let (events, received) = channel();
        std::thread::spawn(move || own(&received));
        let forwarder = Forwarder { events };
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        forwarder.set_target(Target::Vmm(child.id() as i32));
        forwarder.events.send(Event::Signal(libc::SIGKILL)).unwrap();
        assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGKILL));
        assert_eq!(forwarder.interrupted(), None);
    }
}
