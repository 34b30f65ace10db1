//! Waiting for the guest agent: its readiness line on the console (docs/agent.md).
//!
//! The console's writer is wrapped in a [`ReadyScanner`] when the VM is built: it passes every
//! byte on (to the console file) and, as the guest writes it, recognises the agent's readiness
//! or fatal line and sends it over a channel, which [`wait_ready`] receives. Nothing reads the
//! console file back.

use std::io::{self, Write};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

/// The line the agent prints once its ports are open.
pub const READY_PREFIX: &str = "HULL_AGENT_READY ";
/// The line the agent prints before it powers off on a fatal error.
pub const FATAL_PREFIX: &str = "HULL_AGENT_FATAL ";
/// The longest console line kept while looking for the readiness line: the guest writes the
/// console, and a line without an end must not grow hull-vmm's memory.
const MAX_LINE: usize = 64 << 10;

/// What the readiness line said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ready {
    /// When the line appeared.
    pub at: Instant,
    /// The guest's uptime then (from the line's JSON), in milliseconds.
    pub guest_uptime_ms: Option<u64>,
}

/// What the agent said on the console about its start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentReport {
    /// The readiness line.
    Ready(Ready),
    /// The fatal line's message.
    Fatal(String),
}

/// Why the agent did not become ready.
#[derive(Debug, thiserror::Error)]
pub enum ReadyError {
    #[error("the guest agent failed: {0}")]
    Fatal(String),
    #[error("the guest agent was not ready within {} s", .0.as_secs())]
    Timeout(Duration),
    #[error("the VM's console closed before the guest agent was ready")]
    ConsoleClosed,
}

/// Waits until the agent's readiness line comes from `reports` (a [`ReadyScanner`]'s), for at
/// most `deadline` from `since`.
pub fn wait_ready(
    reports: &Receiver<AgentReport>,
    since: Instant,
    deadline: Duration,
) -> Result<Ready, ReadyError> {
    let end = since + deadline;
    match reports.recv_timeout(end.saturating_duration_since(Instant::now())) {
        Ok(AgentReport::Ready(ready)) => Ok(ready),
        Ok(AgentReport::Fatal(message)) => Err(ReadyError::Fatal(message)),
        Err(RecvTimeoutError::Timeout) => Err(ReadyError::Timeout(deadline)),
        Err(RecvTimeoutError::Disconnected) => Err(ReadyError::ConsoleClosed),
    }
}

pub use hull_contract::tail;

/// A console writer that passes everything to `inner` and sends the agent's first readiness
/// or fatal line to a channel; after that (or once nobody listens) it only passes bytes on.
pub struct ReadyScanner<W> {
    inner: W,
    /// `None` once a report went out or the receiver is gone.
    reports: Option<Sender<AgentReport>>,
    /// The current line, while it may still be one of the agent's.
    line: Vec<u8>,
    /// The current line cannot be one of the agent's: wait for its end.
    skipping: bool,
}

impl<W> ReadyScanner<W> {
    /// Wraps `inner`, reporting to `reports`.
    pub fn new(inner: W, reports: Sender<AgentReport>) -> Self {
        Self {
            inner,
            reports: Some(reports),
            line: Vec::new(),
            skipping: false,
        }
    }

    fn scan(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            if self.reports.is_none() {
                return;
            }
            if byte == b'\n' {
                if !self.skipping {
                    self.end_of_line();
                }
                self.line.clear();
                self.skipping = false;
                continue;
            }
            if self.skipping {
                continue;
            }
            self.line.push(byte);
            let could_be = |prefix: &str| {
                let n = self.line.len().min(prefix.len());
                self.line[..n] == prefix.as_bytes()[..n]
            };
            if self.line.len() > MAX_LINE || !(could_be(READY_PREFIX) || could_be(FATAL_PREFIX)) {
                // Not a line anyone waits for.
                self.line.clear();
                self.skipping = true;
            }
        }
    }

    fn end_of_line(&mut self) {
        let text = String::from_utf8_lossy(&self.line);
        let text = text.trim_end_matches('\r');
        let report = if let Some(json) = text.strip_prefix(READY_PREFIX) {
            let uptime = serde_json::from_str::<serde_json::Value>(json)
                .ok()
                .and_then(|v| v.get("uptime_ms").and_then(serde_json::Value::as_u64));
            log::info!("agent ready: {json}");
            AgentReport::Ready(Ready {
                at: Instant::now(),
                guest_uptime_ms: uptime,
            })
        } else if let Some(message) = text.strip_prefix(FATAL_PREFIX) {
            AgentReport::Fatal(message.to_owned())
        } else {
            return;
        };
        if let Some(reports) = self.reports.take() {
            let _ = reports.send(report);
        }
    }
}

impl<W: Write> Write for ReadyScanner<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.scan(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::channel;

    use super::*;

    /// Writes `parts` one `write_all` each, the way the UART hands bytes on.
    fn scan(parts: &[&[u8]]) -> (Vec<u8>, Vec<AgentReport>) {
        let (tx, rx) = channel();
        let mut scanner = ReadyScanner::new(Vec::new(), tx);
        for part in parts {
            scanner.write_all(part).unwrap();
        }
        let out = scanner.inner.clone();
        drop(scanner);
        (out, rx.iter().collect())
    }

    #[test]
    fn the_readiness_line_is_found_across_writes_and_everything_passes() {
        let (out, reports) = scan(&[
            b"boot\r\nHULL_AGENT_RE",
            b"ADY {\"uptime_ms\":5}\r",
            b"\nrest\nHULL_AGENT_READY {}\n",
        ]);
        assert_eq!(
            out,
            b"boot\r\nHULL_AGENT_READY {\"uptime_ms\":5}\r\nrest\nHULL_AGENT_READY {}\n"
        );
        let [AgentReport::Ready(ready)] = &reports[..] else {
            panic!("one readiness report: {reports:?}");
        };
        assert_eq!(ready.guest_uptime_ms, Some(5));
    }

    #[test]
    fn fatal_lines_and_lookalikes() {
        let (_, reports) = scan(&[b"x HULL_AGENT_READY {}\nHULL_AGENT_FATAL cannot mount /proc\n"]);
        assert_eq!(
            reports,
            vec![AgentReport::Fatal("cannot mount /proc".into())]
        );
        // Byte at a time, as the UART writes.
        let text = b"HULL_AGENT_READY {\"uptime_ms\":42}\n";
        let bytes: Vec<&[u8]> = text.chunks(1).collect();
        let (_, reports) = scan(&bytes);
        assert!(
            matches!(&reports[..], [AgentReport::Ready(r)] if r.guest_uptime_ms == Some(42)),
            "{reports:?}"
        );
        // No end of line: no report.
        let (_, reports) = scan(&[b"HULL_AGENT_READY {}"]);
        assert!(reports.is_empty());
    }

    #[test]
    fn a_line_without_an_end_is_not_kept_whole() {
        let (tx, rx) = channel();
        let mut scanner = ReadyScanner::new(io::sink(), tx);
        scanner.write_all(READY_PREFIX.as_bytes()).unwrap();
        scanner.write_all(&vec![b'x'; 3 * MAX_LINE]).unwrap();
        assert!(scanner.line.is_empty() && scanner.skipping);
        // Its end is not a readiness line; the next line can be.
        scanner.write_all(b"\nHULL_AGENT_READY {}\n").unwrap();
        assert!(matches!(rx.try_recv(), Ok(AgentReport::Ready(_))));
    }

    #[test]
    fn waiting_reports_ready_fatal_timeout_and_a_closed_console() {
        let (tx, rx) = channel();
        let ready = Ready {
            at: Instant::now(),
            guest_uptime_ms: Some(42),
        };
        tx.send(AgentReport::Ready(ready)).unwrap();
        assert_eq!(
            wait_ready(&rx, Instant::now(), Duration::from_secs(1)).unwrap(),
            ready
        );
        tx.send(AgentReport::Fatal("cannot mount /proc".into()))
            .unwrap();
        let err = wait_ready(&rx, Instant::now(), Duration::from_secs(1)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the guest agent failed: cannot mount /proc"
        );
        let err = wait_ready(&rx, Instant::now(), Duration::from_millis(30)).unwrap_err();
        assert!(matches!(err, ReadyError::Timeout(_)), "{err}");
        drop(tx);
        let err = wait_ready(&rx, Instant::now(), Duration::from_secs(1)).unwrap_err();
        assert!(matches!(err, ReadyError::ConsoleClosed), "{err}");
    }

    #[test]
    fn tail_reads_the_end_of_a_file() {
        let path = std::env::temp_dir().join(format!("hull-ready-tail-{}", std::process::id()));
        std::fs::write(&path, "boot\nrest").unwrap();
        assert_eq!(tail(&path, 4), "rest");
        std::fs::remove_file(&path).unwrap();
        assert_eq!(tail(&path, 4), "");
    }
}
