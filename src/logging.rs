//! Log output: syslog by default when not on a terminal, stderr otherwise or when asked.
//!
//! Contract: [`init`] never fails the start. If the syslog socket cannot be reached, it says so
//! once on stderr and logs to stderr. The syslog datagram socket is non-blocking, so a slow or
//! stuck syslog daemon can never stall the event loop; a line that syslog does not take (full
//! queue, daemon restarted: one reconnect is tried first) is written to stderr instead, so no
//! line is dropped silently. Lines are plain `key=value` text after a short message; the
//! facility is `daemon`, the tag `docker-socket-router`.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use log::{Level, LevelFilter, Log, Metadata, Record};
use syslog::{Facility, Formatter3164, LoggerBackend};

use crate::cli::LogTarget;

const TAG: &str = "docker-socket-router";

type SyslogLogger = syslog::Logger<LoggerBackend, Formatter3164>;

enum Sink {
    Stderr,
    Syslog { logger: SyslogLogger, path: PathBuf },
}

struct RouterLogger {
    level: LevelFilter,
    sink: Mutex<Sink>,
}

/// Connects to the syslog socket; a datagram socket is made non-blocking.
fn connect_syslog(path: &Path) -> syslog::Result<SyslogLogger> {
    let formatter = Formatter3164 {
        facility: Facility::LOG_DAEMON,
        hostname: None,
        process: TAG.into(),
        pid: std::process::id(),
    };
    let logger = syslog::unix_custom(formatter, path)?;
    if let LoggerBackend::Unix(socket) = &logger.backend {
        socket.set_nonblocking(true)?;
    }
    Ok(logger)
}

fn send(logger: &mut SyslogLogger, level: Level, message: &str) -> syslog::Result<()> {
    match level {
        Level::Error => logger.err(message),
        Level::Warn => logger.warning(message),
        Level::Info => logger.info(message),
        Level::Debug | Level::Trace => logger.debug(message),
    }
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
        let Sink::Syslog { logger, path } = &mut *sink else {
            write_stderr(record.level(), &message);
            return;
        };
        let Err(first) = send(logger, record.level(), &message) else {
            return;
        };
        // The syslog daemon may have restarted: one fresh connection, one more try.
        let retried = connect_syslog(path).and_then(|mut fresh| {
            send(&mut fresh, record.level(), &message)?;
            *logger = fresh;
            Ok(())
        });
        if retried.is_err() {
            write_stderr(
                Level::Warn,
                &format!("syslog did not take a line ({first}): it follows"),
            );
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
        match connect_syslog(syslog_socket) {
            Ok(logger) => Sink::Syslog {
                logger,
                path: syslog_socket.to_path_buf(),
            },
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
        Sink::Syslog { .. } => Chosen::Syslog,
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
