//! Log output: syslog by default when not on a terminal, stderr otherwise or when asked.
//!
//! Contract: nothing here can stall the event loop, and no line is lost without a word.
//! - [`init`] never fails the start. If the syslog socket cannot be reached, it says so once on
//!   stderr and logs to stderr.
//! - The syslog datagram socket is non-blocking. A line syslog does not take (full queue, daemon
//!   restarted: one reconnect is tried first) goes to stderr; the switch is announced once.
//! - stderr is written without blocking too: a socket (journald) with `MSG_DONTWAIT`, a pipe or
//!   terminal through its own non-blocking open file description (so the shell's is untouched).
//!   A line stderr cannot take is counted, and the count is written as soon as stderr takes
//!   lines again.
//!
//! Lines are plain `key=value` text after a short message; the syslog facility is `daemon`,
//! the tag `docker-socket-router`.

use std::io::IsTerminal;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use log::{Level, LevelFilter, Log, Metadata, Record};
use nix::errno::Errno;
use nix::fcntl::{OFlag, open};
use nix::sys::socket::{MsgFlags, send};
use nix::sys::stat::{Mode, SFlag, fstat};
use syslog::{Facility, Formatter3164, LoggerBackend};

use crate::cli::LogTarget;

const TAG: &str = "docker-socket-router";

type SyslogLogger = syslog::Logger<LoggerBackend, Formatter3164>;

/// How stderr is written without blocking.
enum StderrKind {
    /// A socket: `send` with `MSG_DONTWAIT`.
    Socket,
    /// A pipe or terminal, reopened non-blocking through `/proc/self/fd/2`.
    Reopened(OwnedFd),
    /// A regular file (or anything that cannot be reopened): plain writes, which do not block
    /// for long on a file.
    Plain,
}

/// stderr as the logger writes it.
struct Stderr {
    kind: StderrKind,
    /// Lines stderr did not take since it last did.
    dropped: u64,
}

impl Stderr {
    fn open() -> Stderr {
        let stderr = std::io::stderr();
        let kind = match fstat(stderr.as_fd()) {
            Ok(stat) => match SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits()) {
                SFlag::S_IFSOCK => StderrKind::Socket,
                SFlag::S_IFIFO | SFlag::S_IFCHR => open(
                    "/proc/self/fd/2",
                    OFlag::O_WRONLY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC | OFlag::O_NOCTTY,
                    Mode::empty(),
                )
                .map_or(StderrKind::Plain, StderrKind::Reopened),
                _ => StderrKind::Plain,
            },
            Err(_) => StderrKind::Plain,
        };
        Stderr { kind, dropped: 0 }
    }

    /// Writes one whole line or nothing (pipes take writes up to 4 KiB whole).
    fn write_raw(&self, line: &[u8]) -> bool {
        let stderr = std::io::stderr();
        let written = loop {
            let result = match &self.kind {
                StderrKind::Socket => send(
                    stderr.as_fd().as_raw_fd(),
                    line,
                    MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
                ),
                StderrKind::Reopened(fd) => nix::unistd::write(fd, line),
                StderrKind::Plain => nix::unistd::write(stderr.as_fd(), line),
            };
            if result != Err(Errno::EINTR) {
                break result;
            }
        };
        written == Ok(line.len())
    }

    fn write(&mut self, level: Level, message: &str) {
        if self.dropped > 0 {
            let note = format!(
                "{TAG}: WARN {} log lines were dropped: stderr was not taking them\n",
                self.dropped
            );
            if !self.write_raw(note.as_bytes()) {
                self.dropped += 1;
                return;
            }
            self.dropped = 0;
        }
        let line = format!("{TAG}: {level} {message}\n");
        if !self.write_raw(line.as_bytes()) {
            self.dropped += 1;
        }
    }
}

struct Syslog {
    logger: SyslogLogger,
    path: PathBuf,
    /// Lines are going to stderr because syslog stopped taking them.
    failing: bool,
}

struct Sinks {
    syslog: Option<Syslog>,
    stderr: Stderr,
}

struct RouterLogger {
    level: LevelFilter,
    sinks: Mutex<Sinks>,
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

fn send_syslog(logger: &mut SyslogLogger, level: Level, message: &str) -> syslog::Result<()> {
    match level {
        Level::Error => logger.err(message),
        Level::Warn => logger.warning(message),
        Level::Info => logger.info(message),
        Level::Debug | Level::Trace => logger.debug(message),
    }
}

impl Syslog {
    /// Sends a line, reconnecting once (the daemon may have restarted).
    fn send(&mut self, level: Level, message: &str) -> Result<(), syslog::Error> {
        let Err(first) = send_syslog(&mut self.logger, level, message) else {
            return Ok(());
        };
        let mut fresh = connect_syslog(&self.path).map_err(|_| first)?;
        send_syslog(&mut fresh, level, message)?;
        self.logger = fresh;
        Ok(())
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
        let Ok(mut sinks) = self.sinks.lock() else {
            return;
        };
        let Sinks { syslog, stderr } = &mut *sinks;
        let message = record.args().to_string();
        if let Some(syslog) = syslog {
            match syslog.send(record.level(), &message) {
                Ok(()) => {
                    if syslog.failing {
                        syslog.failing = false;
                        stderr.write(Level::Info, "syslog takes lines again");
                    }
                    return;
                }
                Err(err) if !syslog.failing => {
                    syslog.failing = true;
                    let note = format!("syslog does not take lines ({err}); writing them here");
                    stderr.write(Level::Warn, &note);
                }
                Err(_) => {}
            }
        }
        stderr.write(record.level(), &message);
    }

    fn flush(&self) {}
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
    let mut stderr = Stderr::open();
    let syslog = if want_syslog {
        match connect_syslog(syslog_socket) {
            Ok(logger) => Some(Syslog {
                logger,
                path: syslog_socket.to_path_buf(),
                failing: false,
            }),
            Err(err) => {
                let note = format!(
                    "syslog socket {} is not available ({err}); logging to stderr",
                    syslog_socket.display()
                );
                stderr.write(Level::Warn, &note);
                None
            }
        }
    } else {
        None
    };
    let chosen = if syslog.is_some() {
        Chosen::Syslog
    } else {
        Chosen::Stderr
    };
    let logger = RouterLogger {
        level,
        sinks: Mutex::new(Sinks { syslog, stderr }),
    };
    if log::set_boxed_logger(Box::new(logger)).is_ok() {
        log::set_max_level(level);
    }
    chosen
}
