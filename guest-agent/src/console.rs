//! Lines on the console.
//!
//! As PID 1 in the guest the agent's stdout and stderr are `/dev/console` (the serial port),
//! which the host reads. Machine-readable lines (`HULL_AGENT_READY`, `HULL_AGENT_FATAL`) go to
//! stdout, human-readable log lines to stderr. Writing never panics: `println!` would panic on
//! a broken console, and a panic in PID 1 is a fatal error, so errors are ignored here (there is
//! nowhere else to report them).

use std::io::Write;

/// Writes one line to stdout and flushes it, so the host sees it at once.
pub fn emit(line: &str) {
    let mut out = std::io::stdout().lock();
    // Errors are ignored on purpose: the console is the only place to report them.
    let _ = out.write_all(line.as_bytes());
    let _ = out.write_all(b"\n");
    let _ = out.flush();
}

/// Writes one log line, prefixed with `hull-agent: `, to stderr.
pub fn log(message: &str) {
    let mut err = std::io::stderr().lock();
    // See `emit` for why errors are ignored.
    let _ = writeln!(err, "hull-agent: {message}");
    let _ = err.flush();
}
