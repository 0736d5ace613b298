//! Signals as readable events: a non-blocking `signalfd` registered with the poller.
//!
//! Contract: [`Signals::new`] blocks `SIGTERM`, `SIGINT`, `SIGUSR1`, `SIGUSR2` and `SIGHUP` for
//! the (single) thread and delivers them through a descriptor; [`Signals::drain`] reads all pending ones
//! without blocking. `SIGPIPE` stays ignored (Rust's runtime does that), so a write to a closed
//! peer is an `EPIPE` error, not a death.

use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};

use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};

/// What a signal asks the router to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// `SIGTERM` or `SIGINT`.
    Stop,
    /// `SIGUSR1`.
    Counters,
    /// `SIGHUP` (nothing to reload yet) or `SIGUSR2`: logged and ignored, never fatal.
    Ignored(&'static str),
}

pub struct Signals {
    fd: SignalFd,
}

impl Signals {
    pub fn new() -> io::Result<Signals> {
        let mut mask = SigSet::empty();
        for signal in [
            Signal::SIGTERM,
            Signal::SIGINT,
            Signal::SIGUSR1,
            Signal::SIGUSR2,
            Signal::SIGHUP,
        ] {
            mask.add(signal);
        }
        sigprocmask(SigmaskHow::SIG_BLOCK, Some(&mask), None).map_err(io::Error::from)?;
        let fd = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
            .map_err(io::Error::from)?;
        Ok(Signals { fd })
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_fd().as_raw_fd()
    }

    /// Reads every pending signal.
    pub fn drain(&mut self) -> Vec<Request> {
        let mut requests = Vec::new();
        while let Ok(Some(info)) = self.fd.read_signal() {
            let request = match Signal::try_from(info.ssi_signo as i32) {
                Ok(Signal::SIGUSR1) => Request::Counters,
                Ok(Signal::SIGHUP) => Request::Ignored("SIGHUP (nothing to reload)"),
                Ok(Signal::SIGUSR2) => Request::Ignored("SIGUSR2"),
                _ => Request::Stop,
            };
            requests.push(request);
        }
        requests
    }
}
