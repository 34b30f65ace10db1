//! Stdio relays between hull's processes and the container's streams.
//!
//! Never `std::io::copy` (clippy forbids it): on Linux it splices from a socket into a pipe,
//! and splice waits for the socket's data holding the pipe's lock, so whoever reads the pipe
//! sees nothing until the container writes again or ends: output of a process that keeps
//! running is held back.

use std::io;
use std::sync::mpsc::Sender;

/// Copies `from` to `to` with plain reads and writes until the end of `from`.
pub fn pump(from: &mut impl io::Read, to: &mut impl io::Write) -> io::Result<u64> {
    let mut buf = vec![0u8; 64 << 10];
    let mut total = 0;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(err),
        };
        to.write_all(&buf[..n])?;
        total += n as u64;
    }
}

/// What a relay thread runs: [`pump`] from `from` to `to` until the end of `from` (or a write
/// error), then both closed and `done` told. hull-vmm runs it on a thread from its spawn
/// helper, `hull` on a plain one ([`relay`]).
pub fn relay_body<R, W>(
    name: &str,
    mut from: R,
    mut to: W,
    done: Option<Sender<()>>,
) -> impl FnOnce() + Send + 'static
where
    R: io::Read + Send + 'static,
    W: io::Write + Send + 'static,
{
    let name = name.to_owned();
    move || {
        if let Err(err) = pump(&mut from, &mut to) {
            log::debug!("{name} relay: {err}");
        }
        drop(to);
        drop(from);
        if let Some(done) = done {
            let _ = done.send(());
        }
    }
}

/// Copies `from` to `to` ([`relay_body`]) on a thread of its own.
pub fn relay<R, W>(name: &str, from: R, to: W, done: Option<Sender<()>>) -> io::Result<()>
where
    R: io::Read + Send + 'static,
    W: io::Write + Send + 'static,
{
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(relay_body(name, from, to, done))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    use std::sync::mpsc::channel;
    use std::time::Duration;

    use super::*;

    #[test]
    fn relay_copies_to_the_end_and_reports() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let (c, mut d) = UnixStream::pair().unwrap();
        let (tx, rx) = channel();
        relay("test", a, c, Some(tx)).unwrap();
        b.write_all(b"hello").unwrap();
        drop(b);
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
        let mut out = String::new();
        io::Read::read_to_string(&mut d, &mut out).unwrap();
        assert_eq!(out, "hello");
    }
}
