//! The contract between `hull` and `hull-vmm`: everything that crosses between the two
//! processes, in a light crate that both depend on, so that `hull` (and a containerd shim)
//! never links the VMM, KVM or the devices.
//!
//! - [`vm`]: the VM's configuration (`vm.json`), plain data validated before anything starts;
//! - [`container`]: the container's configuration (`container.json`) and the one report line
//!   hull-vmm writes on its sync descriptor;
//! - [`control`]: the client of a container's control socket (the agent's protocol, proxied by
//!   hull-vmm), whose errors keep the agent's error kinds;
//! - [`signals`]: the signals hull-vmm forwards to the container's init, which `hull` forwards
//!   to hull-vmm in turn;
//! - [`console`] and [`relay`]: host ptys sent over `--console-socket`, and the stdio relays;
//! - [`host`]: what kind of KVM this host has (read from sysfs, no KVM call).

pub mod console;
pub mod container;
pub mod control;
pub mod host;
pub mod relay;
pub mod signals;
pub mod vm;

pub use container::{ContainerConfig, ContainerConfigError, CreateReport};
pub use host::KvmKind;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// A writer that takes everything but passes on only the first `left` bytes, then `notice`
/// once: for files a guest fills (its console, hull-vmm's log quoting it), which must not fill
/// the host's disk.
pub struct Capped<W> {
    inner: W,
    left: u64,
    notice: &'static str,
}

impl<W> Capped<W> {
    pub fn new(inner: W, left: u64, notice: &'static str) -> Self {
        Self {
            inner,
            left,
            notice,
        }
    }

    pub fn into_inner(self) -> W {
        self.inner
    }
}

impl<W: std::io::Write> std::io::Write for Capped<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            return Ok(buf.len());
        }
        let take = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.write(&buf[..take])?;
        self.left -= n as u64;
        if self.left == 0 {
            let _ = self.inner.write_all(self.notice.as_bytes());
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// `text` with every control character but newline and tab escaped (`\u{1b}`), and the
/// characters that reorder text (bidirectional overrides and isolates) too, for logs and an
/// operator's terminal: what a guest wrote (its console, its error messages, the names of its
/// processes) must not move a cursor, retitle a window, hide lines or disguise itself.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    escape_if(text, |c| needs_escape(c) && c != '\n' && c != '\t')
}

/// [`printable`], with newlines and tabs escaped too: for one line of a table.
pub fn printable_line(text: &str) -> std::borrow::Cow<'_, str> {
    escape_if(text, needs_escape)
}

fn needs_escape(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

fn escape_if(text: &str, escape: impl Fn(char) -> bool) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(&escape) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if escape(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// The last `max` bytes of a file, as printable text ([`printable`]; for error messages: a
/// log's or a guest console's end).
pub fn tail(path: &Path, max: u64) -> String {
    let Ok(mut file) = File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    printable(&String::from_utf8_lossy(&bytes)).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_text_cannot_drive_a_terminal() {
        assert!(matches!(
            printable("plain\ntext\t!"),
            std::borrow::Cow::Borrowed(_)
        ));
        assert_eq!(
            printable("\u{1b}]0;owned\u{7}\u{1b}[2Jok\r\n"),
            "\\u{1b}]0;owned\\u{7}\\u{1b}[2Jok\\u{d}\n"
        );
        assert_eq!(printable("\u{9b}31m"), "\\u{9b}31m");
        assert_eq!(printable("abc\u{202e}fed"), "abc\\u{202e}fed");
        assert_eq!(printable_line("a\nb\tc"), "a\\u{a}b\\u{9}c");
    }

    #[test]
    fn a_capped_writer_passes_on_the_first_bytes_then_its_notice_once() {
        use std::io::Write;
        let mut capped = Capped::new(Vec::new(), 5, "\n[full]\n");
        capped.write_all(b"abc").unwrap();
        capped.write_all(b"defgh").unwrap();
        capped.write_all(b"ijk").unwrap();
        assert_eq!(capped.into_inner(), b"abcde\n[full]\n");
    }

    #[test]
    fn a_tail_is_printable() {
        let path = std::env::temp_dir().join(format!("hull-tail-{}", std::process::id()));
        std::fs::write(&path, b"early\nlate \x1b[31mred\n").unwrap();
        assert_eq!(tail(&path, 14), "late \\u{1b}[31mred\n");
        std::fs::remove_file(&path).unwrap();
    }
}
