//! What the device fuzz harnesses share (`vsock::fuzz`, `fs::fuzz`): a cursor that turns the
//! fuzzer's bytes into choices, a small xorshift generator for the seeded random-input unit
//! tests, a temporary directory, and a logger that counts what a guest made the VMM log.
//!
//! Only in tests and with the `fuzzing` feature (the targets in `fuzz/`); never in the VMM.

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;

/// The fuzzer's input, read as a stream of choices. Past its end every read is zero, so any
/// input is a complete program.
#[derive(Debug, Clone)]
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    /// Whether every byte has been used.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | u64::from(self.u32()) << 32
    }

    pub fn bool(&mut self) -> bool {
        self.u8() & 1 != 0
    }

    /// A number below `n` (0 if `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        let wide = if n <= 256 {
            usize::from(self.u8())
        } else {
            usize::from(self.u16())
        };
        wide % n
    }

    /// One of `choices` (which must not be empty).
    pub fn pick<T: Copy>(&mut self, choices: &[T]) -> T {
        choices[self.below(choices.len())]
    }

    /// Mostly `usual`; sometimes one of `edges`; sometimes anything.
    pub fn mostly_u32(&mut self, usual: u32, edges: &[u32]) -> u32 {
        match self.u8() % 8 {
            0 => self.u32(),
            1 if !edges.is_empty() => self.pick(edges),
            _ => usual,
        }
    }

    /// Mostly `usual`; sometimes one of `edges`; sometimes anything.
    pub fn mostly_u64(&mut self, usual: u64, edges: &[u64]) -> u64 {
        match self.u8() % 8 {
            0 => self.u64(),
            1 if !edges.is_empty() => self.pick(edges),
            _ => usual,
        }
    }

    /// Up to `max` bytes of the input.
    pub fn bytes(&mut self, max: usize) -> &'a [u8] {
        let n = self.below(max + 1).min(self.data.len());
        let (taken, rest) = self.data.split_at(n);
        self.data = rest;
        taken
    }
}

/// xorshift64*: a few lines of deterministic randomness for the seeded unit tests.
#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// `len` random bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            out.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        out.truncate(len);
        out
    }
}

/// Feeds `inputs` seeded random inputs of up to `max_len` bytes to a fuzz target's `run`: a
/// little of the fuzzer's coverage on every `cargo test`, the same inputs every time.
pub fn run_seeded(seed: u64, inputs: usize, max_len: u64, run: impl Fn(&[u8])) {
    let mut rng = XorShift::new(seed);
    for _ in 0..inputs {
        let len = (rng.next_u64() % max_len) as usize;
        run(&rng.bytes(len));
    }
}

/// A directory removed with everything in it when dropped.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// A fresh directory under the system's temporary directory.
    pub fn new(prefix: &str) -> Self {
        Self::new_in(&std::env::temp_dir(), prefix)
    }

    /// A fresh directory in memory (`/dev/shm`) if there is one: there `fsync` costs nothing,
    /// which keeps a file system fuzzer fast.
    pub fn in_memory(prefix: &str) -> Self {
        let shm = Path::new("/dev/shm");
        if shm.is_dir() {
            Self::new_in(shm, prefix)
        } else {
            Self::new(prefix)
        }
    }

    fn new_in(parent: &Path, prefix: &str) -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let path = parent.join(format!(
            "{prefix}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create a fuzzing temp dir");
        Self(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

thread_local! {
    static WARNINGS: Cell<u64> = const { Cell::new(0) };
}

/// Counts warnings and errors per thread, the way hull-vmm's logger would print them (it
/// hides fuse-backend-rs's messages unless debugging, because that crate logs bad guest input
/// without a rate limit).
struct CountingLogger;

impl log::Log for CountingLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Warn && !metadata.target().starts_with("fuse_backend_rs")
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            WARNINGS.with(|count| count.set(count.get() + 1));
        }
    }

    fn flush(&self) {}
}

/// Installs the counting logger (once per process; another logger already installed wins,
/// and then nothing is counted) and returns this thread's count so far.
pub fn warnings_logged() -> u64 {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        if log::set_logger(&CountingLogger).is_ok() {
            log::set_max_level(log::LevelFilter::Warn);
        }
    });
    WARNINGS.with(Cell::get)
}

/// The most warnings one harness run may log: each `GuestErrorLog` lets `BURST` through per
/// window plus one "suppressed" line, and a run may span a window boundary.
pub fn warning_budget(rate_limiters: u64) -> u64 {
    rate_limiters * 2 * (u64::from(super::GuestErrorLog::BURST) + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_reads_past_its_end_as_zeros() {
        let mut input = Input::new(&[1, 2, 3]);
        assert_eq!(input.u16(), 0x0201);
        assert_eq!(input.u32(), 3);
        assert!(input.is_empty());
        assert_eq!(input.below(10), 0);
        assert_eq!(input.bytes(5), &[] as &[u8]);
    }

    #[test]
    fn xorshift_is_deterministic() {
        let a = XorShift::new(7).bytes(20);
        assert_eq!(a, XorShift::new(7).bytes(20));
        assert_ne!(a, XorShift::new(8).bytes(20));
    }
}
