//! Log output: syslog by default when not on a terminal, stderr otherwise or when asked.
//!
//! Contract: [`init`] never fails the start. If the syslog socket cannot be reached, it says so
//! once on stderr and logs to stderr. A line that syslog refuses later is written to stderr
//! instead, so no line is dropped silently. Lines are plain `key=value` text after a short
//! message; the facility is `daemon`, the tag `docker-socket-router`.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::Mutex;

use log::{Level, LevelFilter, Log, Metadata, Record};
use syslog::{Facility, Formatter3164, LoggerBackend};

use crate::cli::LogTarget;

const TAG: &str = "docker-socket-router";

enum Sink {
    Stderr,
    Syslog(syslog::Logger<LoggerBackend, Formatter3164>),
}

struct RouterLogger {
    level: LevelFilter,
    sink: Mutex<Sink>,
}

impl Log for RouterLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let message = record.args().to_string();
        let Ok(mut sink) = self.sink.lock() else {
            write_stderr(record.level(), &message);
            return;
        };
        if let Sink::Syslog(logger) = &mut *sink {
            let sent = match record.level() {
                Level::Error => logger.err(&message),
                Level::Warn => logger.warning(&message),
                Level::Info => logger.info(&message),
                Level::Debug | Level::Trace => logger.debug(&message),
            };
            if let Err(err) = sent {
                write_stderr(
                    Level::Warn,
                    &format!("syslog refused a line ({err}); it follows"),
                );
                write_stderr(record.level(), &message);
            }
        } else {
            write_stderr(record.level(), &message);
        }
    }

    fn flush(&self) {}
}

fn write_stderr(level: Level, message: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{TAG}: {level} {message}");
}

/// Where logging ended up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chosen {
    Stderr,
    Syslog,
}

/// Installs the logger. Call once, before anything logs.
pub fn init(target: LogTarget, syslog_socket: &Path, verbose: bool) -> Chosen {
    let level = if verbose {
        LevelFilter::Debug
    } else {
        LevelFilter::Info
    };
    let want_syslog = match target {
        LogTarget::Stderr => false,
        LogTarget::Syslog => true,
        LogTarget::Auto => !std::io::stderr().is_terminal(),
    };
    let sink = if want_syslog {
        let formatter = Formatter3164 {
            facility: Facility::LOG_DAEMON,
            hostname: None,
            process: TAG.into(),
            pid: std::process::id(),
        };
        match syslog::unix_custom(formatter, syslog_socket) {
            Ok(logger) => Sink::Syslog(logger),
            Err(err) => {
                write_stderr(
                    Level::Warn,
                    &format!(
                        "syslog socket {} is not available ({err}); logging to stderr",
                        syslog_socket.display()
                    ),
                );
                Sink::Stderr
            }
        }
    } else {
        Sink::Stderr
    };
    let chosen = match sink {
        Sink::Stderr => Chosen::Stderr,
        Sink::Syslog(_) => Chosen::Syslog,
    };
    let logger = RouterLogger {
        level,
        sink: Mutex::new(sink),
    };
    if log::set_boxed_logger(Box::new(logger)).is_ok() {
        log::set_max_level(level);
    }
    chosen
}
