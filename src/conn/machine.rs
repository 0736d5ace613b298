//! The connection state machine: pure transition logic, no sockets, no clock.
//!
//! ```text
//! Accepted ──► Resolving ──► Connecting ──► Piping ──────────────► Closed
//!     │            │              │                                  ▲
//!     └────────────┴──── refuse ──┴──► Draining (head, reply, linger) ┘
//! ```
//!
//! Contract: the shell asks [`Machine::next_op`] what to do, performs exactly that operation on
//! the real socket (or route check), and reports its result with [`Machine::handle`]. Readiness
//! edges from the poller are reported as [`Input::Ready`]; timer expiries as [`Input::Timeout`]
//! with the current time; the shell re-arms its timer whenever [`Machine::deadline`] changes.
//! Time only enters as the `now` argument.
//!
//! Invariants (checked by [`Machine::check_invariants`] after every step in tests and fuzzing):
//! 1. A ring never holds more than its capacity.
//! 2. A read is asked for only when its direction's source is open and its ring has room; a
//!    write only when its ring holds bytes; a shutdown only when the source hit EOF and every byte
//!    before it was written.
//! 3. Every answered operation changes something: it moves bytes, clears a readiness bit, or
//!    changes state. So the shell's drive loop cannot spin without progress.
//! 4. Readiness is state: a readable or writable bit is cleared only by `WouldBlock` (or by end of
//!    stream for reads). A full ring stops reading but keeps the bit, so reading resumes as soon as
//!    the ring drains, without a new edge (no lost wake-up).
//! 5. Piping ends when both directions passed end of stream on, or at once on a hard error.
//!    Piping has no deadline: long streams never time out on their own.
//! 6. A refusal reads the request head (bounded in size and time) before replying, shuts down
//!    its write side after the reply, and discards input until EOF or a short linger deadline.
//! 7. `Closed` asks for nothing more and has no deadline.

use std::time::{Duration, Instant};

use crate::conn::half::{Half, Sink, Source};
use crate::head::HeadReader;
use crate::io::Outcome;
use crate::peercred::PeerCred;
use crate::reply::Refusal;

/// Which socket of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    Client,
    Upstream,
}

impl Side {
    pub fn other(self) -> Side {
        match self {
            Side::Client => Side::Upstream,
            Side::Upstream => Side::Client,
        }
    }
}

/// Remembered readiness of one socket (edge-triggered: an edge sets a bit, `WouldBlock` clears it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Readiness {
    pub readable: bool,
    pub writable: bool,
}

/// The remembered readiness of both sockets of a connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BothReadiness {
    pub client: Readiness,
    pub upstream: Readiness,
}

impl BothReadiness {
    const ALL: BothReadiness = BothReadiness {
        client: Readiness::ALL,
        upstream: Readiness::ALL,
    };

    fn side(&self, side: Side) -> Readiness {
        match side {
            Side::Client => self.client,
            Side::Upstream => self.upstream,
        }
    }

    fn side_mut(&mut self, side: Side) -> &mut Readiness {
        match side {
            Side::Client => &mut self.client,
            Side::Upstream => &mut self.upstream,
        }
    }
}

impl Readiness {
    const ALL: Readiness = Readiness {
        readable: true,
        writable: true,
    };
}

/// Tunables of one connection, fixed at accept time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Capacity of each direction's ring.
    pub buffer_size: usize,
    /// How long a busy upstream (full backlog) is retried before a 504.
    pub connect_timeout: Duration,
    /// How long a refused client may take to send its request head.
    pub head_timeout: Duration,
    /// How long a refused client's remaining input is discarded after the reply.
    pub linger_timeout: Duration,
    /// The most request-head bytes read before replying anyway.
    pub head_limit: usize,
}

/// How the shell's connect attempt went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Connect {
    Connected,
    /// The upstream's accept backlog is full (`EAGAIN`): retry later.
    Busy,
    Failed(Refusal),
}

/// Everything the machine can be told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// The kernel said who the peer is (answer to [`Op::Identify`]).
    Identified(PeerCred),
    /// The route checks passed; `upstream` is the checked socket path (answer to [`Op::Route`]).
    Routed { upstream: String },
    /// The connection cannot be served (answer to `Identify` or `Route`).
    Refused(Refusal),
    /// Answer to [`Op::Connect`].
    Connect(Connect),
    /// A readiness edge from the poller; may be spurious.
    Ready {
        side: Side,
        readable: bool,
        writable: bool,
    },
    /// Answer to [`Op::Read`].
    Read { side: Side, outcome: Outcome },
    /// Answer to [`Op::Write`].
    Wrote { side: Side, outcome: Outcome },
    /// Answer to [`Op::ShutdownWrite`]; errors are irrelevant (a gone peer shows up on the next
    /// read or write).
    ShutDown { side: Side },
    /// A timer fired; the machine checks its own deadline against `now`.
    Timeout,
    /// The router is stopping and the grace period is over: close now.
    Abort,
}

/// The one thing the shell should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Read the peer credentials of the client socket.
    Identify,
    /// Check limits and resolve and check the user's upstream socket.
    Route,
    /// Connect to the checked upstream socket.
    Connect,
    /// Read from this side into [`Machine::read_buf`].
    Read(Side),
    /// Write [`Machine::write_buf`] to this side.
    Write(Side),
    /// `shutdown(Write)` on this side.
    ShutdownWrite(Side),
}

/// How a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// Both directions finished cleanly.
    Completed,
    /// A refusal was answered (or the client left during it).
    Refused(Refusal),
    /// A peer reset the connection.
    Reset(Side),
    /// An I/O error on this side.
    Failed(Side, std::io::ErrorKind),
    /// Closed by the router's shutdown.
    Aborted,
}

impl End {
    /// A short word for log lines.
    pub fn label(&self) -> &'static str {
        match self {
            End::Completed => "completed",
            End::Refused(_) => "refused",
            End::Reset(_) => "reset",
            End::Failed(..) => "error",
            End::Aborted => "aborted",
        }
    }
}

/// The refusal path's steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainPhase {
    /// Reading the request head, so the reply is not lost to a reset.
    ReadingHead,
    /// Writing the reply.
    Replying,
    /// The reply is out: shut down our write side.
    ShuttingDown,
    /// Discarding whatever the client still sends, until EOF.
    Lingering,
}

/// State of a refused connection.
#[derive(Debug)]
pub struct Drain {
    pub refusal: Refusal,
    pub phase: DrainPhase,
    pub head: HeadReader,
    reply: Vec<u8>,
    written: usize,
    client_eof: bool,
    /// Bytes read and dropped after the head.
    discarded: u64,
    deadline: Instant,
    scratch: Box<[u8]>,
}

/// Size of the scratch buffer a refusal reads into; the bytes are inspected, then dropped.
const DRAIN_SCRATCH: usize = 4096;

/// The state of a connection; each variant owns exactly what is valid in that phase.
#[derive(Debug)]
pub enum State {
    /// The client socket exists; its credentials are not read yet.
    Accepted,
    /// The peer is known; the route (limits, path, checks) is pending.
    Resolving,
    /// Connecting to the upstream; `retry_at` is set while waiting out a full backlog.
    Connecting {
        attempts: u32,
        retry_at: Option<Instant>,
        deadline: Instant,
        started: Instant,
    },
    /// Both directions flowing.
    Piping {
        to_upstream: Half,
        to_client: Half,
        /// Which direction gets the next turn, so a busy one cannot starve the other.
        turn: Side,
    },
    /// Refusing: read head, reply, shut down, linger.
    Draining(Box<Drain>),
    /// Finished; the shell frees the slot.
    Closed(End),
}

impl State {
    pub fn name(&self) -> &'static str {
        match self {
            State::Accepted => "accepted",
            State::Resolving => "resolving",
            State::Connecting { .. } => "connecting",
            State::Piping { .. } => "piping",
            State::Draining(_) => "draining",
            State::Closed(_) => "closed",
        }
    }
}

/// Back-off between connect attempts to a busy upstream: 2 ms doubling up to 100 ms.
fn connect_backoff(attempts: u32) -> Duration {
    let shift = attempts.min(6);
    Duration::from_millis((2u64 << shift).min(100))
}

/// See [`Machine::progress_marker`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProgressMarker {
    state: &'static str,
    ready: BothReadiness,
    numbers: [u64; 6],
}

/// One connection's transition logic and byte buffers.
#[derive(Debug)]
pub struct Machine {
    /// The connection id, for log lines.
    id: u64,
    settings: Settings,
    state: State,
    ready: BothReadiness,
    peer: Option<PeerCred>,
    upstream: Option<String>,
    /// Bytes delivered to the upstream and to the client, kept when the halves are dropped.
    bytes_up: u64,
    bytes_down: u64,
}

impl Machine {
    pub fn new(id: u64, settings: Settings) -> Self {
        Machine {
            id,
            settings,
            state: State::Accepted,
            ready: BothReadiness::default(),
            peer: None,
            upstream: None,
            bytes_up: 0,
            bytes_down: 0,
        }
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    pub fn peer(&self) -> Option<PeerCred> {
        self.peer
    }

    pub fn upstream(&self) -> Option<&str> {
        self.upstream.as_deref()
    }

    pub fn readiness(&self, side: Side) -> Readiness {
        self.ready.side(side)
    }

    /// Bytes written to the upstream and to the client so far.
    pub fn bytes(&self) -> (u64, u64) {
        match &self.state {
            State::Piping {
                to_upstream,
                to_client,
                ..
            } => (to_upstream.delivered, to_client.delivered),
            _ => (self.bytes_up, self.bytes_down),
        }
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed(_))
    }

    pub fn end(&self) -> Option<&End> {
        match &self.state {
            State::Closed(end) => Some(end),
            _ => None,
        }
    }

    /// Bytes of buffer memory this connection holds right now.
    pub fn buffered_capacity(&self) -> usize {
        match &self.state {
            State::Piping {
                to_upstream,
                to_client,
                ..
            } => [to_upstream, to_client]
                .iter()
                .filter(|half| half.ring.is_allocated())
                .map(|half| half.ring.capacity())
                .sum(),
            State::Draining(_) => DRAIN_SCRATCH,
            _ => 0,
        }
    }

    /// Whether the connection holds an admission (counts against the connection limits).
    pub fn is_admitted_state(&self) -> bool {
        matches!(
            self.state,
            State::Accepted | State::Resolving | State::Connecting { .. } | State::Piping { .. }
        )
    }

    /// A snapshot of everything an operation can change; equal snapshots around an answered
    /// operation mean it made no progress (invariant 3).
    pub fn progress_marker(&self) -> ProgressMarker {
        let numbers = match &self.state {
            State::Accepted | State::Resolving | State::Closed(_) => [0; 6],
            State::Connecting {
                attempts, retry_at, ..
            } => [
                u64::from(*attempts),
                u64::from(retry_at.is_some()),
                0,
                0,
                0,
                0,
            ],
            State::Piping {
                to_upstream,
                to_client,
                ..
            } => {
                let flags = |half: &Half| {
                    u64::from(half.source == Source::Eof)
                        | u64::from(half.sink == Sink::ShutdownSent) << 1
                };
                [
                    to_upstream.ring.len() as u64,
                    to_client.ring.len() as u64,
                    to_upstream.delivered,
                    to_client.delivered,
                    flags(to_upstream),
                    flags(to_client),
                ]
            }
            State::Draining(drain) => [
                drain.phase as u64,
                drain.written as u64,
                drain.head.bytes_seen() as u64,
                drain.discarded,
                u64::from(drain.client_eof),
                0,
            ],
        };
        ProgressMarker {
            state: self.state.name(),
            ready: self.ready,
            numbers,
        }
    }

    /// When the machine wants a [`Input::Timeout`], if ever.
    pub fn deadline(&self) -> Option<Instant> {
        match &self.state {
            State::Connecting {
                retry_at, deadline, ..
            } => Some(retry_at.map_or(*deadline, |retry| retry.min(*deadline))),
            State::Draining(drain) => Some(drain.deadline),
            _ => None,
        }
    }

    /// The next operation the shell should perform, or `None` to wait for an event or timer.
    pub fn next_op(&self) -> Option<Op> {
        match &self.state {
            State::Accepted => Some(Op::Identify),
            State::Resolving => Some(Op::Route),
            State::Connecting { retry_at, .. } => retry_at.is_none().then_some(Op::Connect),
            State::Piping {
                to_upstream,
                to_client,
                turn,
            } => {
                let first = self.half_op(*turn, to_upstream, to_client);
                first.or_else(|| self.half_op(turn.other(), to_upstream, to_client))
            }
            State::Draining(drain) => self.drain_op(drain),
            State::Closed(_) => None,
        }
    }

    /// The operation for the direction whose source is `source`, if it has one.
    fn half_op(&self, source: Side, to_upstream: &Half, to_client: &Half) -> Option<Op> {
        let half = match source {
            Side::Client => to_upstream,
            Side::Upstream => to_client,
        };
        let sink = source.other();
        if half.has_pending() && self.readiness(sink).writable {
            Some(Op::Write(sink))
        } else if half.must_shutdown() {
            Some(Op::ShutdownWrite(sink))
        } else if half.can_read() && self.readiness(source).readable {
            Some(Op::Read(source))
        } else {
            None
        }
    }

    fn drain_op(&self, drain: &Drain) -> Option<Op> {
        let client = self.readiness(Side::Client);
        match drain.phase {
            DrainPhase::ReadingHead | DrainPhase::Lingering => {
                client.readable.then_some(Op::Read(Side::Client))
            }
            DrainPhase::Replying => client.writable.then_some(Op::Write(Side::Client)),
            DrainPhase::ShuttingDown => Some(Op::ShutdownWrite(Side::Client)),
        }
    }

    /// Where the shell puts the bytes of an [`Op::Read`] on `side`.
    pub fn read_buf(&mut self, side: Side) -> &mut [u8] {
        match &mut self.state {
            State::Piping {
                to_upstream,
                to_client,
                ..
            } => match side {
                Side::Client => to_upstream.ring.writable_slice(),
                Side::Upstream => to_client.ring.writable_slice(),
            },
            State::Draining(drain) if side == Side::Client => &mut drain.scratch,
            _ => &mut [],
        }
    }

    /// The bytes the shell should try to write for an [`Op::Write`] on `side`.
    pub fn write_buf(&self, side: Side) -> &[u8] {
        match &self.state {
            State::Piping {
                to_upstream,
                to_client,
                ..
            } => match side {
                Side::Upstream => to_upstream.ring.readable_slice(),
                Side::Client => to_client.ring.readable_slice(),
            },
            State::Draining(drain) if side == Side::Client => {
                drain.reply.get(drain.written..).unwrap_or(&[])
            }
            _ => &[],
        }
    }

    /// Applies one input at time `now`.
    pub fn handle(&mut self, input: Input, now: Instant) {
        match input {
            Input::Ready {
                side,
                readable,
                writable,
            } => {
                let ready = self.ready.side_mut(side);
                ready.readable |= readable;
                ready.writable |= writable;
            }
            Input::Abort => self.set_state(State::Closed(End::Aborted)),
            Input::Identified(cred) => {
                if matches!(self.state, State::Accepted) {
                    self.peer = Some(cred);
                    self.set_state(State::Resolving);
                }
            }
            Input::Routed { upstream } => {
                if matches!(self.state, State::Resolving) {
                    self.upstream = Some(upstream);
                    self.set_state(State::Connecting {
                        attempts: 0,
                        retry_at: None,
                        deadline: now + self.settings.connect_timeout,
                        started: now,
                    });
                }
            }
            Input::Refused(refusal) => {
                if matches!(self.state, State::Accepted | State::Resolving) {
                    self.refuse(refusal, now);
                }
            }
            Input::Connect(result) => self.on_connect(result, now),
            Input::Timeout => self.on_timeout(now),
            Input::Read { side, outcome } => self.on_read(side, outcome, now),
            Input::Wrote { side, outcome } => self.on_wrote(side, outcome, now),
            Input::ShutDown { side } => self.on_shutdown(side, now),
        }
    }

    fn set_state(&mut self, next: State) {
        log::debug!(
            "conn={} state {} -> {} uid={}",
            self.id,
            self.state.name(),
            next.name(),
            self.peer.map_or(-1, |peer| i64::from(peer.uid))
        );
        if let State::Piping {
            to_upstream,
            to_client,
            ..
        } = &self.state
        {
            self.bytes_up = to_upstream.delivered;
            self.bytes_down = to_client.delivered;
        }
        self.state = next;
    }

    fn refuse(&mut self, refusal: Refusal, now: Instant) {
        // The client may have sent its request long ago; look for it without waiting for an edge.
        self.ready.client = Readiness::ALL;
        self.set_state(State::Draining(Box::new(Drain {
            refusal,
            phase: DrainPhase::ReadingHead,
            head: HeadReader::new(self.settings.head_limit),
            reply: Vec::new(),
            written: 0,
            client_eof: false,
            discarded: 0,
            deadline: now + self.settings.head_timeout,
            scratch: vec![0u8; DRAIN_SCRATCH].into_boxed_slice(),
        })));
    }

    fn on_connect(&mut self, result: Connect, now: Instant) {
        let State::Connecting {
            attempts,
            retry_at,
            deadline,
            ..
        } = &mut self.state
        else {
            return;
        };
        if retry_at.is_some() {
            return; // not asked for: ignore
        }
        match result {
            Connect::Connected => {
                // Both sockets may already hold data or room; a wrong guess costs one WouldBlock.
                self.ready = BothReadiness::ALL;
                let buffer_size = self.settings.buffer_size;
                self.set_state(State::Piping {
                    to_upstream: Half::new(buffer_size),
                    to_client: Half::new(buffer_size),
                    turn: Side::Client,
                });
            }
            Connect::Busy => {
                *attempts = attempts.saturating_add(1);
                if now >= *deadline {
                    self.connect_timed_out(now);
                } else {
                    *retry_at = Some(now + connect_backoff(*attempts));
                }
            }
            Connect::Failed(refusal) => self.refuse(refusal, now),
        }
    }

    fn connect_timed_out(&mut self, now: Instant) {
        let waited = match &self.state {
            State::Connecting { started, .. } => now.saturating_duration_since(*started),
            _ => Duration::ZERO,
        };
        let refusal = Refusal::ConnectTimeout {
            uid: self.peer.map_or(0, |peer| peer.uid),
            path: self.upstream.clone().unwrap_or_default(),
            waited,
        };
        self.refuse(refusal, now);
    }

    fn on_timeout(&mut self, now: Instant) {
        match &mut self.state {
            State::Connecting {
                retry_at, deadline, ..
            } => {
                if now >= *deadline {
                    self.connect_timed_out(now);
                } else if retry_at.is_some_and(|retry| now >= retry) {
                    *retry_at = None;
                }
            }
            State::Draining(drain) if now >= drain.deadline => match drain.phase {
                DrainPhase::ReadingHead => {
                    // A silent client still gets its answer.
                    Self::start_reply(drain, now, self.settings.linger_timeout);
                }
                _ => {
                    let end = End::Refused(drain.refusal.clone());
                    self.set_state(State::Closed(end));
                }
            },
            _ => {}
        }
    }

    fn start_reply(drain: &mut Drain, now: Instant, linger: Duration) {
        drain.reply = drain.refusal.reply(drain.head.is_head_method());
        drain.written = 0;
        drain.phase = DrainPhase::Replying;
        drain.deadline = now + linger;
    }

    fn on_read(&mut self, side: Side, outcome: Outcome, now: Instant) {
        let linger = self.settings.linger_timeout;
        match &mut self.state {
            State::Piping {
                to_upstream,
                to_client,
                turn,
            } => {
                let half = match side {
                    Side::Client => to_upstream,
                    Side::Upstream => to_client,
                };
                *turn = side.other();
                match outcome {
                    Outcome::Progress(n) => half.ring.commit(n),
                    Outcome::WouldBlock => {
                        self.ready.side_mut(side).readable = false;
                        half.ring.release();
                    }
                    Outcome::Eof => {
                        half.source = Source::Eof;
                        self.ready.side_mut(side).readable = false;
                    }
                    Outcome::Reset => self.set_state(State::Closed(End::Reset(side))),
                    Outcome::Failed(kind) => self.set_state(State::Closed(End::Failed(side, kind))),
                }
                self.finish_if_done();
            }
            State::Draining(drain) if side == Side::Client => match outcome {
                Outcome::Progress(n) => {
                    if drain.phase == DrainPhase::ReadingHead {
                        let bytes = drain.scratch.get(..n).unwrap_or(&[]);
                        if drain.head.feed(bytes).is_decided() {
                            Self::start_reply(drain, now, linger);
                        }
                    } else {
                        drain.discarded += n as u64;
                    }
                }
                Outcome::WouldBlock => self.ready.client.readable = false,
                Outcome::Eof => {
                    self.ready.client.readable = false;
                    drain.client_eof = true;
                    match drain.phase {
                        DrainPhase::ReadingHead => Self::start_reply(drain, now, linger),
                        DrainPhase::Lingering => {
                            let end = End::Refused(drain.refusal.clone());
                            self.set_state(State::Closed(end));
                        }
                        DrainPhase::Replying | DrainPhase::ShuttingDown => {}
                    }
                }
                Outcome::Reset | Outcome::Failed(_) => {
                    let end = End::Refused(drain.refusal.clone());
                    self.set_state(State::Closed(end));
                }
            },
            _ => {}
        }
    }

    fn on_wrote(&mut self, side: Side, outcome: Outcome, now: Instant) {
        let linger = self.settings.linger_timeout;
        match &mut self.state {
            State::Piping {
                to_upstream,
                to_client,
                turn,
            } => {
                let half = match side {
                    Side::Upstream => to_upstream,
                    Side::Client => to_client,
                };
                *turn = side;
                match outcome {
                    Outcome::Progress(n) => {
                        let n = n.min(half.ring.len());
                        half.ring.consume(n);
                        half.delivered += n as u64;
                        if half.ring.is_empty() && !self.ready.side(side.other()).readable {
                            // The source is idle: hold no buffer while waiting for it.
                            half.ring.release();
                        }
                    }
                    Outcome::WouldBlock => self.ready.side_mut(side).writable = false,
                    Outcome::Eof | Outcome::Reset => {
                        self.set_state(State::Closed(End::Reset(side)))
                    }
                    Outcome::Failed(kind) => self.set_state(State::Closed(End::Failed(side, kind))),
                }
                self.finish_if_done();
            }
            State::Draining(drain) if side == Side::Client => match outcome {
                Outcome::Progress(n) => {
                    drain.written = (drain.written + n).min(drain.reply.len());
                    if drain.phase == DrainPhase::Replying && drain.written == drain.reply.len() {
                        drain.phase = DrainPhase::ShuttingDown;
                        drain.deadline = now + linger;
                    }
                }
                Outcome::WouldBlock => self.ready.client.writable = false,
                Outcome::Eof | Outcome::Reset | Outcome::Failed(_) => {
                    let end = End::Refused(drain.refusal.clone());
                    self.set_state(State::Closed(end));
                }
            },
            _ => {}
        }
    }

    fn on_shutdown(&mut self, side: Side, now: Instant) {
        let linger = self.settings.linger_timeout;
        match &mut self.state {
            State::Piping {
                to_upstream,
                to_client,
                ..
            } => {
                let half = match side {
                    Side::Upstream => to_upstream,
                    Side::Client => to_client,
                };
                if half.must_shutdown() {
                    half.sink = Sink::ShutdownSent;
                    half.ring.release();
                }
                self.finish_if_done();
            }
            State::Draining(drain)
                if side == Side::Client && drain.phase == DrainPhase::ShuttingDown =>
            {
                if drain.client_eof {
                    let end = End::Refused(drain.refusal.clone());
                    self.set_state(State::Closed(end));
                } else {
                    drain.phase = DrainPhase::Lingering;
                    drain.deadline = now + linger;
                }
            }
            _ => {}
        }
    }

    fn finish_if_done(&mut self) {
        if let State::Piping {
            to_upstream,
            to_client,
            ..
        } = &self.state
            && to_upstream.is_finished()
            && to_client.is_finished()
        {
            self.set_state(State::Closed(End::Completed));
        }
    }

    /// Checks the numbered invariants of the module doc that can be seen from the state alone.
    pub fn check_invariants(&self) -> Result<(), String> {
        match &self.state {
            State::Piping {
                to_upstream,
                to_client,
                ..
            } => {
                for (name, half) in [("to_upstream", to_upstream), ("to_client", to_client)] {
                    if half.ring.len() > half.ring.capacity() {
                        return Err(format!("{name}: ring holds more than its capacity"));
                    }
                    if half.sink == Sink::ShutdownSent
                        && (half.source != Source::Eof || half.has_pending())
                    {
                        return Err(format!("{name}: shut down before all bytes were delivered"));
                    }
                }
            }
            State::Draining(drain) => {
                if drain.written > drain.reply.len() {
                    return Err("reply written past its end".into());
                }
                if drain.phase != DrainPhase::ReadingHead && drain.reply.is_empty() {
                    return Err("replying without a reply".into());
                }
            }
            State::Closed(_) if self.next_op().is_some() || self.deadline().is_some() => {
                return Err("closed connection still asks for work".into());
            }
            _ => {}
        }
        match self.next_op() {
            Some(Op::Read(side)) if self.read_buf_len(side) == 0 => {
                Err(format!("asks to read {side:?} with no room"))
            }
            Some(Op::Write(side)) if self.write_buf(side).is_empty() => {
                Err(format!("asks to write {side:?} with nothing to write"))
            }
            _ => Ok(()),
        }
    }

    fn read_buf_len(&self, side: Side) -> usize {
        match &self.state {
            State::Piping {
                to_upstream,
                to_client,
                ..
            } => {
                let ring = match side {
                    Side::Client => &to_upstream.ring,
                    Side::Upstream => &to_client.ring,
                };
                ring.capacity() - ring.len()
            }
            State::Draining(drain) if side == Side::Client => drain.scratch.len(),
            _ => 0,
        }
    }
}
