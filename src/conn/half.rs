//! One direction of a pipe: a ring, the state of its source and the state of its sink.
//!
//! Contract (smoltcp vocabulary): a half *may* read while its source is open, and *can* read when
//! it also has room; it *must* pass end of stream on (shut down its sink's write side) once its
//! source hit EOF and its ring is empty, and only then. A half is finished when that shutdown has
//! been sent, or once its sink broke (the peer behind it is gone, so its undelivered bytes have
//! nowhere to go and are dropped). Nothing here touches a socket.

use crate::ring::Ring;

/// The reading end of a direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Open,
    /// The peer sent end of stream; nothing more will be read.
    Eof,
}

/// The writing end of a direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sink {
    Open,
    /// `shutdown(Write)` was done; nothing more will be written.
    ShutdownSent,
    /// The peer behind the sink is gone (reset, broken pipe); nothing more can be written.
    Broken,
}

/// One direction of the pipe.
#[derive(Debug)]
pub struct Half {
    pub ring: Ring,
    pub source: Source,
    pub sink: Sink,
    /// Bytes written to the sink so far.
    pub delivered: u64,
}

impl Half {
    pub fn new(buffer_size: usize) -> Self {
        Half {
            ring: Ring::new(buffer_size),
            source: Source::Open,
            sink: Sink::Open,
            delivered: 0,
        }
    }

    /// The source is open and the bytes still have somewhere to go.
    pub fn may_read(&self) -> bool {
        self.source == Source::Open && self.sink != Sink::Broken
    }

    /// Reading now would be allowed and has somewhere to put the bytes.
    pub fn can_read(&self) -> bool {
        self.may_read() && !self.ring.is_full()
    }

    /// Bytes are waiting for the sink.
    pub fn has_pending(&self) -> bool {
        !self.ring.is_empty()
    }

    /// End of stream reached the ring's end and has not been passed on yet.
    pub fn must_shutdown(&self) -> bool {
        self.source == Source::Eof && self.ring.is_empty() && self.sink == Sink::Open
    }

    /// Nothing more will ever be written: end of stream was passed on, or the sink broke.
    pub fn is_finished(&self) -> bool {
        self.sink != Sink::Open
    }

    /// The sink's peer is gone: drop what is queued for it and stop carrying bytes.
    pub fn break_sink(&mut self) {
        self.sink = Sink::Broken;
        self.ring.clear();
    }
}
