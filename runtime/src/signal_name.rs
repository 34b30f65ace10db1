//! Signal names and numbers as `hull kill` takes them, like `runc kill`: a number, or a name
//! with or without the `SIG` prefix in any case (`KILL`, `sigterm`, `SIGUSR1`), or a real-time
//! signal as `RTMIN+N` / `RTMAX-N`.
//!
//! The numbers are Linux x86-64's, the container's (the guest is x86-64 Linux whatever the
//! host's C library says). `SIGRTMIN` is 34 and `SIGRTMAX` 64 as in glibc and `kill -l`: the
//! kernel's first two real-time signals are reserved by the C library.

/// The first real-time signal as the C library numbers it.
pub const SIGRTMIN: i32 = 34;
/// The last real-time signal.
pub const SIGRTMAX: i32 = 64;

/// Standard signal names without `SIG`, with the aliases Linux has (`IOT`, `CLD`, `POLL`).
const NAMES: [(&str, i32); 34] = [
    ("HUP", 1),
    ("INT", 2),
    ("QUIT", 3),
    ("ILL", 4),
    ("TRAP", 5),
    ("ABRT", 6),
    ("IOT", 6),
    ("BUS", 7),
    ("FPE", 8),
    ("KILL", 9),
    ("USR1", 10),
    ("SEGV", 11),
    ("USR2", 12),
    ("PIPE", 13),
    ("ALRM", 14),
    ("TERM", 15),
    ("STKFLT", 16),
    ("CHLD", 17),
    ("CLD", 17),
    ("CONT", 18),
    ("STOP", 19),
    ("TSTP", 20),
    ("TTIN", 21),
    ("TTOU", 22),
    ("URG", 23),
    ("XCPU", 24),
    ("XFSZ", 25),
    ("VTALRM", 26),
    ("PROF", 27),
    ("WINCH", 28),
    ("IO", 29),
    ("POLL", 29),
    ("PWR", 30),
    ("SYS", 31),
];

/// A signal `hull kill` cannot send.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignalError {
    #[error("unknown signal {0:?}")]
    Unknown(String),
    #[error("invalid signal number {0}: Linux signals are 1 to {SIGRTMAX}")]
    OutOfRange(i64),
}

/// The number of signal `s` (see the module comment for the forms taken).
pub fn parse_signal(s: &str) -> Result<i32, SignalError> {
    if let Ok(number) = s.parse::<i64>() {
        return match i32::try_from(number) {
            Ok(n @ 1..=SIGRTMAX) => Ok(n),
            _ => Err(SignalError::OutOfRange(number)),
        };
    }
    let unknown = || SignalError::Unknown(s.to_owned());
    let upper = s.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    if let Some(&(_, n)) = NAMES.iter().find(|(known, _)| *known == name) {
        return Ok(n);
    }
    let realtime = if let Some(rest) = name.strip_prefix("RTMIN") {
        offset(rest, '+').map(|n| SIGRTMIN + n)
    } else if let Some(rest) = name.strip_prefix("RTMAX") {
        offset(rest, '-').map(|n| SIGRTMAX - n)
    } else {
        None
    };
    realtime
        .filter(|n| (SIGRTMIN..=SIGRTMAX).contains(n))
        .ok_or_else(unknown)
}

/// The `N` of `+N` (or `-N`); nothing at all is 0.
fn offset(rest: &str, sign: char) -> Option<i32> {
    if rest.is_empty() {
        return Some(0);
    }
    let digits = rest.strip_prefix(sign)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_with_or_without_sig_in_any_case() {
        for (s, n) in [
            ("KILL", 9),
            ("kill", 9),
            ("SIGKILL", 9),
            ("sigterm", 15),
            ("SigUsr1", 10),
            ("USR2", 12),
            ("HUP", 1),
            ("INT", 2),
            ("CHLD", 17),
            ("CLD", 17),
            ("STKFLT", 16),
            ("WINCH", 28),
            ("IO", 29),
            ("POLL", 29),
            ("PWR", 30),
            ("SYS", 31),
            ("IOT", 6),
            ("ABRT", 6),
            ("STOP", 19),
            ("CONT", 18),
        ] {
            assert_eq!(parse_signal(s), Ok(n), "{s}");
        }
    }

    #[test]
    fn every_standard_number_has_a_name() {
        for n in 1..=31 {
            assert!(NAMES.iter().any(|(_, m)| *m == n), "{n}");
        }
    }

    #[test]
    fn numbers_are_1_to_64() {
        assert_eq!(parse_signal("9"), Ok(9));
        assert_eq!(parse_signal("1"), Ok(1));
        assert_eq!(parse_signal("32"), Ok(32));
        assert_eq!(parse_signal("64"), Ok(64));
        assert_eq!(parse_signal("0"), Err(SignalError::OutOfRange(0)));
        assert_eq!(parse_signal("65"), Err(SignalError::OutOfRange(65)));
        assert_eq!(parse_signal("-9"), Err(SignalError::OutOfRange(-9)));
        assert_eq!(
            parse_signal("99999999999").unwrap_err().to_string(),
            "invalid signal number 99999999999: Linux signals are 1 to 64"
        );
    }

    #[test]
    fn realtime_signals_count_from_rtmin_and_rtmax() {
        for (s, n) in [
            ("RTMIN", 34),
            ("SIGRTMIN", 34),
            ("rtmin+1", 35),
            ("SIGRTMIN+30", 64),
            ("RTMAX", 64),
            ("SIGRTMAX-1", 63),
            ("sigrtmax-30", 34),
        ] {
            assert_eq!(parse_signal(s), Ok(n), "{s}");
        }
        for bad in [
            "RTMIN+31", "RTMAX-31", "RTMIN-1", "RTMAX+1", "RTMIN+", "RTMIN+x", "RTMIN++1",
            "RTMIN 1",
        ] {
            assert_eq!(
                parse_signal(bad),
                Err(SignalError::Unknown(bad.to_owned())),
                "{bad}"
            );
        }
    }

    #[test]
    fn unknown_names_are_quoted_as_given() {
        assert_eq!(
            parse_signal("FOO").unwrap_err().to_string(),
            "unknown signal \"FOO\""
        );
        assert_eq!(
            parse_signal("sigfoo").unwrap_err().to_string(),
            "unknown signal \"sigfoo\""
        );
        for bad in ["", "SIG", " KILL", "KILL ", "SIGSIGKILL", "9x"] {
            assert_eq!(
                parse_signal(bad),
                Err(SignalError::Unknown(bad.to_owned())),
                "{bad:?}"
            );
        }
    }
}
