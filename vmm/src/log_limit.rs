//! Rate limits for log lines that a guest or a local user can cause at will (a descriptor
//! limit reached on every accept, a client refused on every connection): the first is logged,
//! then one a period, each saying how many were left out, so the log stays bounded and the
//! news still gets through.

use std::time::{Duration, Instant};

/// At most one message a `period`.
#[derive(Debug)]
pub struct LogLimit {
    period: Duration,
    last: Option<Instant>,
    left_out: u64,
}

impl LogLimit {
    pub const fn new(period: Duration) -> Self {
        Self {
            period,
            last: None,
            left_out: 0,
        }
    }

    /// `Some(n)`: log this one, after `n` left out since the last; `None`: leave it out.
    pub fn check(&mut self) -> Option<u64> {
        self.check_at(Instant::now())
    }

    fn check_at(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.duration_since(last) < self.period => {
                self.left_out += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.left_out))
            }
        }
    }
}

/// " (N more like it left out)" for `n` > 0, for the end of a rate-limited line.
pub fn left_out(n: u64) -> String {
    match n {
        0 => String::new(),
        n => format!(" ({n} more like it left out)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_a_period_counting_the_rest() {
        let mut limit = LogLimit::new(Duration::from_secs(60));
        let t0 = Instant::now();
        assert_eq!(limit.check_at(t0), Some(0));
        for i in 1..=1000 {
            assert_eq!(limit.check_at(t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(limit.check_at(t0 + Duration::from_secs(60)), Some(1000));
        assert_eq!(limit.check_at(t0 + Duration::from_secs(61)), None);
        assert_eq!(left_out(0), "");
        assert_eq!(left_out(3), " (3 more like it left out)");
    }
}
