//! Waiting for the guest agent: its readiness line on the console (docs/agent.md).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::time::{Duration, Instant};

/// The line the agent prints once its ports are open.
pub const READY_PREFIX: &str = "HULL_AGENT_READY ";
/// The line the agent prints before it powers off on a fatal error.
pub const FATAL_PREFIX: &str = "HULL_AGENT_FATAL ";
/// The longest console line kept while looking for the readiness line: the guest writes the
/// console, and a line without an end must not grow hull-vmm's memory.
const MAX_LINE: usize = 64 << 10;
/// How often the console is looked at while waiting.
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// What the readiness line said.
#[derive(Debug, Clone, Copy)]
pub struct Ready {
    /// When the line appeared.
    pub at: Instant,
    /// The guest's uptime then (from the line's JSON), in milliseconds.
    pub guest_uptime_ms: Option<u64>,
}

/// Why the agent did not become ready.
#[derive(Debug, thiserror::Error)]
pub enum ReadyError {
    #[error("the guest agent failed: {0}")]
    Fatal(String),
    #[error("the guest agent was not ready within {} s", .0.as_secs())]
    Timeout(Duration),
}

/// Waits until the agent's readiness line is on the console file `console`, for at most
/// `deadline` from `since`.
pub fn wait_ready(console: &Path, since: Instant, deadline: Duration) -> Result<Ready, ReadyError> {
    let end = since + deadline;
    let mut watcher = LineWatcher::default();
    loop {
        for line in watcher.poll(console) {
            if let Some(json) = line.strip_prefix(READY_PREFIX) {
                let uptime = serde_json::from_str::<serde_json::Value>(json)
                    .ok()
                    .and_then(|v| v.get("uptime_ms").and_then(serde_json::Value::as_u64));
                log::info!("agent ready: {json}");
                return Ok(Ready {
                    at: Instant::now(),
                    guest_uptime_ms: uptime,
                });
            }
            if let Some(msg) = line.strip_prefix(FATAL_PREFIX) {
                return Err(ReadyError::Fatal(msg.to_owned()));
            }
        }
        if Instant::now() >= end {
            return Err(ReadyError::Timeout(deadline));
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

pub use hull_contract::tail;

/// Reads the lines a growing file gains, a poll at a time.
#[derive(Default)]
struct LineWatcher {
    offset: u64,
    partial: Vec<u8>,
}

impl LineWatcher {
    /// The complete lines added since the last poll.
    fn poll(&mut self, path: &Path) -> Vec<String> {
        let Ok(mut file) = File::open(path) else {
            return Vec::new();
        };
        if file.seek(SeekFrom::Start(self.offset)).is_err() {
            return Vec::new();
        }
        let mut fresh = Vec::new();
        let Ok(n) = file.read_to_end(&mut fresh) else {
            return Vec::new();
        };
        self.offset += n as u64;
        self.partial.extend_from_slice(&fresh);
        let mut lines = Vec::new();
        while let Some(pos) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=pos).collect();
            let text = String::from_utf8_lossy(&line);
            lines.push(text.trim_end_matches(['\r', '\n']).to_owned());
        }
        if self.partial.len() > MAX_LINE {
            // Not a line anyone waits for: keep only its end.
            let excess = self.partial.len() - MAX_LINE;
            self.partial.drain(..excess);
        }
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_file(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("hull-ready-{name}-{}", std::process::id()))
    }

    #[test]
    fn line_watcher_returns_whole_lines_as_they_grow() {
        let path = temp_file("watch");
        std::fs::write(&path, "boot\r\nHULL_AGENT_RE").unwrap();
        let mut w = LineWatcher::default();
        assert_eq!(w.poll(&path), vec!["boot".to_owned()]);
        assert!(w.poll(&path).is_empty());
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        std::io::Write::write_all(&mut f, b"ADY {\"uptime_ms\":5}\nrest").unwrap();
        assert_eq!(
            w.poll(&path),
            vec!["HULL_AGENT_READY {\"uptime_ms\":5}".to_owned()]
        );
        assert_eq!(tail(&path, 4), "rest");
        std::fs::remove_file(&path).unwrap();
        assert!(w.poll(&path).is_empty());

        // A line without an end is not kept whole.
        let mut w = LineWatcher::default();
        std::fs::write(&path, vec![b'x'; 3 * MAX_LINE]).unwrap();
        assert!(w.poll(&path).is_empty());
        assert_eq!(w.partial.len(), MAX_LINE);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn ready_fatal_and_timeout() {
        let path = temp_file("ready");
        std::fs::write(&path, "x\nHULL_AGENT_READY {\"uptime_ms\":42}\n").unwrap();
        let ready = wait_ready(&path, Instant::now(), Duration::from_secs(1)).unwrap();
        assert_eq!(ready.guest_uptime_ms, Some(42));

        std::fs::write(&path, "HULL_AGENT_FATAL cannot mount /proc\n").unwrap();
        let err = wait_ready(&path, Instant::now(), Duration::from_secs(1)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the guest agent failed: cannot mount /proc"
        );

        std::fs::write(&path, "booting\n").unwrap();
        let err = wait_ready(&path, Instant::now(), Duration::from_millis(30)).unwrap_err();
        assert!(matches!(err, ReadyError::Timeout(_)), "{err}");
        std::fs::remove_file(&path).unwrap();
    }
}
