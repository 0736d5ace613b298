//! The one place where I/O results are classified.
//!
//! Contract: every `read`/`write` result on a connection socket is turned into an [`Outcome`]
//! here, and nowhere else looks at `io::ErrorKind` or errno for connection sockets.
//! `Interrupted` never escapes: the shell retries the call (see [`retry_interrupted`]).
//! A read of 0 bytes is end of stream; a write of 0 bytes from a non-empty buffer is a failure.

use std::fmt;
use std::io;

/// What one read or write on a socket achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// `n > 0` bytes were moved.
    Progress(usize),
    /// The socket has nothing to give or no room to take: wait for the next readiness edge.
    WouldBlock,
    /// The peer closed its sending side (reads only).
    Eof,
    /// The peer is gone (`ECONNRESET`, `EPIPE`, `ENOTCONN`).
    Reset,
    /// Any other error; the connection cannot go on.
    Failed(io::ErrorKind),
}

impl Outcome {
    /// Classifies the result of a `read` into a buffer of `requested` bytes.
    pub fn of_read(result: io::Result<usize>, requested: usize) -> Outcome {
        match result {
            Ok(0) if requested > 0 => Outcome::Eof,
            Ok(0) => Outcome::WouldBlock,
            Ok(n) => Outcome::Progress(n),
            Err(err) => Outcome::of_error(&err),
        }
    }

    /// Classifies the result of a `write` of `offered` bytes.
    pub fn of_write(result: io::Result<usize>, offered: usize) -> Outcome {
        match result {
            Ok(0) if offered > 0 => Outcome::Failed(io::ErrorKind::WriteZero),
            Ok(0) => Outcome::WouldBlock,
            Ok(n) => Outcome::Progress(n),
            Err(err) => Outcome::of_error(&err),
        }
    }

    fn of_error(err: &io::Error) -> Outcome {
        match err.kind() {
            io::ErrorKind::WouldBlock => Outcome::WouldBlock,
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::NotConnected => Outcome::Reset,
            kind => Outcome::Failed(kind),
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Progress(n) => write!(f, "{n} bytes"),
            Outcome::WouldBlock => f.write_str("would block"),
            Outcome::Eof => f.write_str("end of stream"),
            Outcome::Reset => f.write_str("reset by peer"),
            Outcome::Failed(kind) => write!(f, "{kind}"),
        }
    }
}

/// Runs a system call again while it fails with `EINTR`.
pub fn retry_interrupted<T>(mut call: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match call() {
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_outcome_classifies_reads_and_writes() {
        assert_eq!(Outcome::of_read(Ok(0), 10), Outcome::Eof);
        assert_eq!(Outcome::of_read(Ok(4), 10), Outcome::Progress(4));
        assert_eq!(
            Outcome::of_write(Ok(0), 3),
            Outcome::Failed(io::ErrorKind::WriteZero)
        );
        let reset = io::Error::from(io::ErrorKind::ConnectionReset);
        assert_eq!(Outcome::of_read(Err(reset), 1), Outcome::Reset);
        let pipe = io::Error::from_raw_os_error(nix::libc::EPIPE);
        assert_eq!(Outcome::of_write(Err(pipe), 1), Outcome::Reset);
        let again = io::Error::from_raw_os_error(nix::libc::EAGAIN);
        assert_eq!(Outcome::of_write(Err(again), 1), Outcome::WouldBlock);
    }

    #[test]
    fn test_retry_interrupted_retries_only_eintr() {
        let mut calls = 0;
        let result = retry_interrupted(|| {
            calls += 1;
            if calls < 3 {
                Err(io::Error::from(io::ErrorKind::Interrupted))
            } else {
                Ok(calls)
            }
        });
        assert_eq!(result.unwrap(), 3);
    }
}
