//! runc's logging flags: `--log FILE` (append), `--log-format text|json`, `--debug`.
//!
//! Without `--log`, warnings and errors go to standard error (and debug messages with
//! `--debug`). With it, everything at the chosen level goes to the file in runc's formats:
//! `time="..." level=info msg="..."` or `{"level":"info","msg":"...","time":"..."}`.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// The log file's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

struct Logger {
    file: Option<Mutex<File>>,
    format: LogFormat,
}

/// Installs the logger. Fails if the log file cannot be opened.
pub fn init(path: Option<&Path>, format: LogFormat, debug: bool) -> std::io::Result<bool> {
    let file = match path {
        Some(path) => Some(Mutex::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?,
        )),
        None => None,
    };
    let has_file = file.is_some();
    let level = match (debug, has_file) {
        (true, _) => log::LevelFilter::Debug,
        (false, true) => log::LevelFilter::Info,
        (false, false) => log::LevelFilter::Warn,
    };
    log::set_max_level(level);
    let _ = log::set_logger(Box::leak(Box::new(Logger { file, format })));
    Ok(has_file)
}

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let level = record.level().as_str().to_lowercase();
        let msg = record.args().to_string();
        match &self.file {
            Some(file) => {
                let line = format_line(self.format, &level, &msg, &rfc3339(SystemTime::now()));
                if let Ok(mut file) = file.lock() {
                    let _ = file.write_all(line.as_bytes());
                }
            }
            // Messages may quote the guest: nothing in them may drive the terminal.
            None => eprintln!("hull: {level}: {}", hull_contract::printable(&msg)),
        }
    }

    fn flush(&self) {}
}

fn format_line(format: LogFormat, level: &str, msg: &str, time: &str) -> String {
    match format {
        LogFormat::Text => format!(
            "time={} level={level} msg={}\n",
            serde_json::Value::from(time),
            serde_json::Value::from(msg)
        ),
        LogFormat::Json => {
            let value = serde_json::json!({"level": level, "msg": msg, "time": time});
            format!("{value}\n")
        }
    }
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` in UTC.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_are_utc_rfc3339() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_709_210_096_789);
        assert_eq!(rfc3339(t), "2024-02-29T12:34:56.789Z");
    }

    #[test]
    fn text_and_json_lines() {
        assert_eq!(
            format_line(LogFormat::Text, "error", "say \"hi\"", "T"),
            "time=\"T\" level=error msg=\"say \\\"hi\\\"\"\n"
        );
        assert_eq!(
            format_line(LogFormat::Json, "info", "x", "T"),
            "{\"level\":\"info\",\"msg\":\"x\",\"time\":\"T\"}\n"
        );
    }
}
