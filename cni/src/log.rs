//! Log lines: to `log_file` if configured, else stderr (which runtimes log). Logging never
//! fails the plugin.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, Copy)]
pub enum Level {
    Info,
    Warn,
    Error,
}

pub struct Logger {
    file: Option<File>,
    /// Said on every line: the command and the container.
    context: String,
}

impl Logger {
    pub fn stderr(context: String) -> Logger {
        Logger {
            file: None,
            context,
        }
    }

    /// Appends to `path`; falls back to stderr, saying so, if it cannot be opened.
    pub fn to_file(path: &Path, context: String) -> Logger {
        match OpenOptions::new().create(true).append(true).open(path) {
            Ok(file) => Logger {
                file: Some(file),
                context,
            },
            Err(e) => {
                let logger = Logger::stderr(context);
                logger.log(
                    Level::Warn,
                    &format!("cannot open log_file {}: {e}", path.display()),
                );
                logger
            }
        }
    }

    pub fn set_context(&mut self, context: String) {
        self.context = context;
    }

    pub fn log(&self, level: Level, message: &str) {
        let level = match level {
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        };
        // One write per line, so that lines of concurrent invocations (one per pod) appending
        // to the same file do not interleave.
        let line = format!(
            "{} zmesh-cni {level} {}: {message}\n",
            rfc3339(SystemTime::now()),
            self.context
        );
        let _ = match &self.file {
            Some(file) => (&mut &*file).write_all(line.as_bytes()),
            None => std::io::stderr().write_all(line.as_bytes()),
        };
    }
}

/// `2026-05-01T10:00:00Z` (UTC, seconds), without a date library.
pub fn rfc3339(time: SystemTime) -> String {
    let secs = time
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// Days since 1970-01-01 to (year, month, day): Howard Hinnant's `civil_from_days`.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps() {
        let at = |secs| rfc3339(UNIX_EPOCH + Duration::from_secs(secs));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_709_251_199), "2024-02-29T23:59:59Z");
        assert_eq!(at(1_777_629_600), "2026-05-01T10:00:00Z");
    }
}
