//! The log: lines to `--log-path` / `PUT /logger` (a file or named pipe) at `--level`, or to
//! stderr (warnings and errors) until one is configured. Format as Firecracker's:
//! `TIMESTAMP [ID:THREAD] LEVEL message`.

use std::fs::File;
use std::io::Write;
use std::sync::Mutex;

use crate::api::models::{LogLevel, Logger};

struct State {
    file: Option<File>,
    level: LogLevel,
    show_level: bool,
    show_origin: bool,
    id: String,
}

static STATE: Mutex<State> = Mutex::new(State {
    file: None,
    level: LogLevel::Warning,
    show_level: false,
    show_origin: false,
    id: String::new(),
});

/// Sets the instance id printed on every line (`--id`).
pub fn set_id(id: &str) {
    if let Ok(mut s) = STATE.lock() {
        s.id = id.to_string();
    }
}

/// Applies a logger configuration (`PUT /logger`, `--log-path`/`--level`).
pub fn configure(l: &Logger) -> Result<(), String> {
    let file = match &l.log_path {
        Some(p) => Some(
            crate::metrics::open_sink(std::path::Path::new(p))
                .map_err(|e| format!("log_path {p}: {e}"))?,
        ),
        None => None,
    };
    let mut s = STATE
        .lock()
        .map_err(|_| "logger lock poisoned".to_string())?;
    if let Some(f) = file {
        s.file = Some(f);
    }
    if let Some(level) = l.level {
        s.level = level;
    }
    if let Some(v) = l.show_level {
        s.show_level = v;
    }
    if let Some(v) = l.show_log_origin {
        s.show_origin = v;
    }
    Ok(())
}

/// `YYYY-MM-DDTHH:MM:SS.nnnnnnnnn` (UTC).
fn timestamp() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86400, secs % 86400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_nanos()
    )
}

/// Logs `msg` at `level` (from `origin`).
pub fn log(level: LogLevel, origin: &str, msg: std::fmt::Arguments) {
    let Ok(mut s) = STATE.lock() else { return };
    if level > s.level || level == LogLevel::Off {
        return;
    }
    let thread = std::thread::current();
    let mut line = format!(
        "{} [{}:{}]",
        timestamp(),
        if s.id.is_empty() {
            "anonymous-instance"
        } else {
            &s.id
        },
        thread.name().unwrap_or("?")
    );
    if s.show_level {
        line.push_str(&format!(" {level:?}"));
    }
    if s.show_origin {
        line.push_str(&format!(" {origin}"));
    }
    line.push_str(&format!(" {msg}\n"));
    match s.file.as_mut() {
        Some(f) => {
            let _ = f.write_all(line.as_bytes());
        }
        None => {
            let _ = std::io::stderr().write_all(line.as_bytes());
        }
    }
}

/// Logs a warning.
pub fn warn(msg: std::fmt::Arguments) {
    log(LogLevel::Warning, module_path!(), msg);
}

/// Logs information.
pub fn info(msg: std::fmt::Arguments) {
    log(LogLevel::Info, module_path!(), msg);
}

/// Logs a debug message.
pub fn debug(msg: std::fmt::Arguments) {
    log(LogLevel::Debug, module_path!(), msg);
}

#[cfg(test)]
mod tests {
    #[test]
    fn timestamp_is_iso8601() {
        let t = super::timestamp();
        assert_eq!(t.len(), 29, "{t}");
        assert_eq!(&t[4..5], "-");
        assert_eq!(&t[10..11], "T");
    }
}
