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
//! 5. A peer that is gone (a reset or broken pipe on its socket) ends only what involves it: the
//!    direction towards it breaks (its undelivered bytes have nowhere to go), the direction from
//!    it ends like an EOF after a read reset, and bytes already read from it are still delivered.
//!    Piping ends when both directions are finished (end of stream passed on, or sink broken),
//!    or at once on any other I/O error. Piping has no deadline: long streams never time out.
//! 6. A refusal reads the request head (bounded in size and time) before replying, shuts down
//!    its write side after the reply, and discards input until EOF; reply, shutdown and linger
//!    share one linger period, so a refusal ends within head timeout + linger timeout.
//!    A user far over their connection limit is answered at once, after one read of what the
//!    client already sent, and closed without lingering ([`Input::RefusedNow`]), so refusals
//!    cannot be used to hold the slots every user shares.
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
    /// The connection cannot be served and may not hold its slot: reply at once, after reading
    /// only what the client already sent, and close without lingering (answer to `Route` when
    /// the user is far over their connection limit).
    RefusedNow(Refusal),
    /// Answer to [`Op::Connect`].
    Connect(Connect),
    /// A readiness edge from the poller; may be spurious. `hangup` says the peer can no longer
    /// receive (it closed its socket): the direction towards it ends even if nothing is
    /// pending for it, so a client that vanished is noticed while its daemon stays silent.
    Ready {
        side: Side,
        readable: bool,
        writable: bool,
        hangup: bool,
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
    /// A hurried refusal reads only what the client already sent, and closes right after the
    /// reply instead of lingering.
    hurried: bool,
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
    /// The first side found gone while piping, for the end label.
    first_reset: Option<Side>,
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
            first_reset: None,
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
            State::Draining(drain) => drain.scratch.len() + drain.reply.capacity(),
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
                hangup,
            } => {
                let ready = self.ready.side_mut(side);
                ready.readable |= readable;
                ready.writable |= writable;
                if hangup {
                    self.on_hangup(side);
                }
            }
            Input::Abort => {
                if !self.is_closed() {
                    self.set_state(State::Closed(End::Aborted));
                }
            }
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
            Input::RefusedNow(refusal) => {
                if matches!(self.state, State::Accepted | State::Resolving) {
                    self.refuse_now(refusal, now);
                }
            }
            Input::Connect(result) => self.on_connect(result, now),
            Input::Timeout => self.on_timeout(now),
            Input::Read { side, outcome } => self.on_read(side, outcome, now),
            Input::Wrote { side, outcome } => self.on_wrote(side, outcome),
            Input::ShutDown { side } => self.on_shutdown(side),
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
            hurried: false,
            discarded: 0,
            deadline: now + self.settings.head_timeout,
            scratch: vec![0u8; DRAIN_SCRATCH].into_boxed_slice(),
        })));
    }

    fn refuse_now(&mut self, refusal: Refusal, now: Instant) {
        self.refuse(refusal, now);
        if let State::Draining(drain) = &mut self.state {
            drain.hurried = true;
            drain.deadline = now + self.settings.linger_timeout;
        }
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
                let (from, towards) = match side {
                    Side::Client => (to_upstream, to_client),
                    Side::Upstream => (to_client, to_upstream),
                };
                *turn = side.other();
                match outcome {
                    Outcome::Progress(n) => from.ring.commit(n),
                    Outcome::WouldBlock => {
                        self.ready.side_mut(side).readable = false;
                        from.ring.release();
                    }
                    Outcome::Eof => {
                        from.source = Source::Eof;
                        self.ready.side_mut(side).readable = false;
                    }
                    Outcome::Reset => {
                        // The peer is gone: what it sent is still delivered, nothing reaches it.
                        from.source = Source::Eof;
                        towards.break_sink();
                        self.ready.side_mut(side).readable = false;
                        self.first_reset.get_or_insert(side);
                    }
                    Outcome::Failed(kind) => self.set_state(State::Closed(End::Failed(side, kind))),
                }
                self.finish_if_done();
            }
            State::Draining(drain) if side == Side::Client => match outcome {
                Outcome::Progress(n) => {
                    if drain.phase == DrainPhase::ReadingHead {
                        let bytes = drain.scratch.get(..n).unwrap_or(&[]);
                        if drain.head.feed(bytes).is_decided() || drain.hurried {
                            Self::start_reply(drain, now, linger);
                        }
                    } else {
                        drain.discarded += n as u64;
                    }
                }
                Outcome::WouldBlock => {
                    self.ready.client.readable = false;
                    if drain.phase == DrainPhase::ReadingHead && drain.hurried {
                        Self::start_reply(drain, now, linger);
                    }
                }
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

    fn on_wrote(&mut self, side: Side, outcome: Outcome) {
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
                        // Bytes from this peer may still wait to be read: only this direction ends.
                        half.break_sink();
                        self.ready.side_mut(side).writable = false;
                        self.first_reset.get_or_insert(side);
                    }
                    Outcome::Failed(kind) => self.set_state(State::Closed(End::Failed(side, kind))),
                }
                self.finish_if_done();
            }
            State::Draining(drain) if side == Side::Client => match outcome {
                Outcome::Progress(n) => {
                    drain.written = (drain.written + n).min(drain.reply.len());
                    if drain.phase == DrainPhase::Replying && drain.written == drain.reply.len() {
                        // The deadline set when the reply started stays: reply, shutdown and
                        // linger share one linger period, so a refusal ends within head + linger.
                        drain.phase = DrainPhase::ShuttingDown;
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

    fn on_shutdown(&mut self, side: Side) {
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
                if drain.client_eof || drain.hurried {
                    let end = End::Refused(drain.refusal.clone());
                    self.set_state(State::Closed(end));
                } else {
                    drain.phase = DrainPhase::Lingering;
                }
            }
            _ => {}
        }
    }

    /// The peer on `side` closed its socket. A sink we already shut down ourselves stays as it
    /// is (our own shutdown plus the peer's half-close also reads as a hangup); an open one
    /// breaks, as a write to it would.
    fn on_hangup(&mut self, side: Side) {
        if let State::Piping {
            to_upstream,
            to_client,
            ..
        } = &mut self.state
        {
            let towards = match side {
                Side::Client => to_client,
                Side::Upstream => to_upstream,
            };
            if towards.sink == Sink::Open {
                // A peer that left after taking everything it was sent ended normally.
                if towards.has_pending() {
                    self.first_reset.get_or_insert(side);
                }
                towards.break_sink();
            }
            self.finish_if_done();
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
            let end = self.first_reset.map_or(End::Completed, End::Reset);
            self.set_state(State::Closed(end));
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
                    if half.sink == Sink::Broken && half.has_pending() {
                        return Err(format!("{name}: bytes queued for a broken sink"));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reply::{Forbidden, Limit};

    const CRED: PeerCred = PeerCred {
        uid: 1000,
        gid: 1000,
        pid: 42,
    };

    fn settings(buffer_size: usize) -> Settings {
        Settings {
            buffer_size,
            connect_timeout: Duration::from_secs(5),
            head_timeout: Duration::from_secs(2),
            linger_timeout: Duration::from_secs(1),
            head_limit: 64,
        }
    }

    fn not_running() -> Refusal {
        Refusal::DaemonNotRunning {
            uid: 1000,
            path: "/run/user/1000/docker.sock".into(),
        }
    }

    /// A machine taken through identify and route, waiting for its connect.
    fn connecting(now: Instant) -> Machine {
        let mut m = Machine::new(1, settings(8));
        assert_eq!(m.next_op(), Some(Op::Identify));
        m.handle(Input::Identified(CRED), now);
        assert_eq!(m.next_op(), Some(Op::Route));
        m.handle(
            Input::Routed {
                upstream: "/run/user/1000/docker.sock".into(),
            },
            now,
        );
        assert_eq!(m.next_op(), Some(Op::Connect));
        m
    }

    /// A piping machine with every readiness bit cleared, as after draining both sockets.
    fn piping(now: Instant) -> Machine {
        let mut m = connecting(now);
        m.handle(Input::Connect(Connect::Connected), now);
        assert_eq!(m.state().name(), "piping");
        for side in [Side::Client, Side::Upstream] {
            let (read, wrote) = (Outcome::WouldBlock, Outcome::WouldBlock);
            m.handle(
                Input::Read {
                    side,
                    outcome: read,
                },
                now,
            );
            m.handle(
                Input::Wrote {
                    side,
                    outcome: wrote,
                },
                now,
            );
        }
        assert_eq!(m.next_op(), None);
        m
    }

    fn edge(m: &mut Machine, side: Side, readable: bool, writable: bool, now: Instant) {
        answer(
            m,
            Input::Ready {
                side,
                readable,
                writable,
                hangup: false,
            },
            now,
        );
    }

    /// The edge of a peer that closed its socket: readable, writable, hung up.
    fn hangup(m: &mut Machine, side: Side, now: Instant) {
        let (readable, writable, hangup) = (true, true, true);
        let input = Input::Ready {
            side,
            readable,
            writable,
            hangup,
        };
        answer(m, input, now);
    }

    /// A readable edge on `side`, one read that returns `bytes` (EOF when empty), then
    /// `WouldBlock` as a drained socket would say, so no readiness bit is left behind.
    fn read(m: &mut Machine, side: Side, bytes: &[u8], now: Instant) {
        edge(m, side, true, false, now);
        let buf = m.read_buf(side);
        assert!(buf.len() >= bytes.len(), "room for the test bytes");
        buf[..bytes.len()].copy_from_slice(bytes);
        let outcome = if bytes.is_empty() {
            Outcome::Eof
        } else {
            Outcome::Progress(bytes.len())
        };
        answer(m, Input::Read { side, outcome }, now);
        if !bytes.is_empty() {
            let outcome = Outcome::WouldBlock;
            answer(m, Input::Read { side, outcome }, now);
        }
    }

    /// Answers the write the machine asks for on `side` with `outcome`.
    fn write(m: &mut Machine, side: Side, outcome: Outcome, now: Instant) {
        assert_eq!(m.next_op(), Some(Op::Write(side)));
        answer(m, Input::Wrote { side, outcome }, now);
    }

    fn answer(m: &mut Machine, input: Input, now: Instant) {
        m.handle(input, now);
        m.check_invariants().unwrap();
    }

    #[test]
    fn test_accepted_identified_goes_resolving() {
        let now = Instant::now();
        let mut m = Machine::new(1, settings(8));
        assert_eq!(m.state().name(), "accepted");
        m.handle(Input::Identified(CRED), now);
        assert_eq!(m.state().name(), "resolving");
        assert_eq!(m.peer(), Some(CRED));
    }

    #[test]
    fn test_accepted_refused_drains() {
        let now = Instant::now();
        let mut m = Machine::new(1, settings(8));
        m.handle(Input::Refused(Refusal::Internal("no cred".into())), now);
        assert_eq!(m.state().name(), "draining");
        assert_eq!(m.next_op(), Some(Op::Read(Side::Client)));
    }

    #[test]
    fn test_resolving_routed_connects_with_deadline() {
        let now = Instant::now();
        let m = connecting(now);
        assert_eq!(m.deadline(), Some(now + Duration::from_secs(5)));
        assert_eq!(m.upstream(), Some("/run/user/1000/docker.sock"));
    }

    #[test]
    fn test_connecting_busy_retries_after_backoff_not_busy_loop() {
        let now = Instant::now();
        let mut m = connecting(now);
        answer(&mut m, Input::Connect(Connect::Busy), now);
        assert_eq!(m.next_op(), None, "waits for the back-off timer");
        let retry = m.deadline().unwrap();
        assert!(retry > now && retry < now + Duration::from_millis(200));
        answer(&mut m, Input::Timeout, retry - Duration::from_micros(1));
        assert_eq!(m.next_op(), None, "an early timer does not retry");
        answer(&mut m, Input::Timeout, retry);
        assert_eq!(m.next_op(), Some(Op::Connect));
    }

    #[test]
    fn test_connecting_deadline_passed_refuses_504() {
        let now = Instant::now();
        let mut m = connecting(now);
        answer(&mut m, Input::Connect(Connect::Busy), now);
        answer(&mut m, Input::Timeout, now + Duration::from_secs(5));
        let State::Draining(drain) = m.state() else {
            panic!("expected draining, got {}", m.state().name());
        };
        assert_eq!(drain.refusal.status(), 504);
    }

    #[test]
    fn test_connecting_failed_refuses_with_its_reason() {
        let now = Instant::now();
        let mut m = connecting(now);
        answer(&mut m, Input::Connect(Connect::Failed(not_running())), now);
        assert_eq!(m.state().name(), "draining");
    }

    #[test]
    fn test_piping_bytes_flow_both_ways() {
        let now = Instant::now();
        let mut m = piping(now);
        read(&mut m, Side::Client, b"ping", now);
        assert_eq!(
            m.next_op(),
            None,
            "the upstream has not said it can take bytes"
        );
        edge(&mut m, Side::Upstream, false, true, now);
        assert_eq!(m.write_buf(Side::Upstream), b"ping");
        write(&mut m, Side::Upstream, Outcome::Progress(4), now);
        read(&mut m, Side::Upstream, b"pong", now);
        edge(&mut m, Side::Client, false, true, now);
        write(&mut m, Side::Client, Outcome::Progress(4), now);
        assert_eq!(m.bytes(), (4, 4));
    }

    #[test]
    fn test_piping_full_ring_stops_reading_and_resumes_without_edge() {
        let now = Instant::now();
        let mut m = piping(now);
        edge(&mut m, Side::Client, true, false, now);
        assert_eq!(m.next_op(), Some(Op::Read(Side::Client)));
        m.read_buf(Side::Client).copy_from_slice(b"12345678");
        let outcome = Outcome::Progress(8);
        answer(
            &mut m,
            Input::Read {
                side: Side::Client,
                outcome,
            },
            now,
        );
        assert_eq!(m.next_op(), None, "a full ring is not read into");
        assert!(
            m.readiness(Side::Client).readable,
            "the readable bit is kept"
        );
        edge(&mut m, Side::Upstream, false, true, now);
        write(&mut m, Side::Upstream, Outcome::Progress(8), now);
        // No new edge from the client, yet reading it resumes.
        assert_eq!(m.next_op(), Some(Op::Read(Side::Client)));
    }

    #[test]
    fn test_piping_short_write_keeps_the_rest_in_order() {
        let now = Instant::now();
        let mut m = piping(now);
        read(&mut m, Side::Upstream, b"abcdef", now);
        edge(&mut m, Side::Client, false, true, now);
        write(&mut m, Side::Client, Outcome::Progress(2), now);
        assert_eq!(m.write_buf(Side::Client), b"cdef");
        write(&mut m, Side::Client, Outcome::WouldBlock, now);
        assert_eq!(m.next_op(), None);
    }

    #[test]
    fn test_piping_client_eof_shuts_upstream_write_after_flush() {
        let now = Instant::now();
        let mut m = piping(now);
        read(&mut m, Side::Client, b"stdin", now);
        read(&mut m, Side::Client, b"", now);
        assert_eq!(
            m.next_op(),
            None,
            "no shutdown while bytes before the EOF are queued"
        );
        edge(&mut m, Side::Upstream, false, true, now);
        write(&mut m, Side::Upstream, Outcome::Progress(5), now);
        assert_eq!(m.next_op(), Some(Op::ShutdownWrite(Side::Upstream)));
        answer(
            &mut m,
            Input::ShutDown {
                side: Side::Upstream,
            },
            now,
        );
        // The other direction keeps flowing.
        assert_eq!(m.state().name(), "piping");
        read(&mut m, Side::Upstream, b"out", now);
        edge(&mut m, Side::Client, false, true, now);
        write(&mut m, Side::Client, Outcome::Progress(3), now);
        assert_eq!(m.bytes(), (5, 3));
    }

    #[test]
    fn test_piping_both_eofs_complete() {
        let now = Instant::now();
        let mut m = piping(now);
        read(&mut m, Side::Client, b"", now);
        assert_eq!(m.next_op(), Some(Op::ShutdownWrite(Side::Upstream)));
        answer(
            &mut m,
            Input::ShutDown {
                side: Side::Upstream,
            },
            now,
        );
        read(&mut m, Side::Upstream, b"", now);
        assert_eq!(m.next_op(), Some(Op::ShutdownWrite(Side::Client)));
        answer(&mut m, Input::ShutDown { side: Side::Client }, now);
        assert_eq!(m.end(), Some(&End::Completed));
        assert_eq!(m.next_op(), None);
        assert_eq!(m.deadline(), None);
    }

    #[test]
    fn test_piping_upstream_reset_on_write_still_delivers_its_output() {
        let now = Instant::now();
        let mut m = piping(now);
        read(&mut m, Side::Upstream, b"bye", now);
        read(&mut m, Side::Client, b"leftover", now);
        edge(&mut m, Side::Upstream, false, true, now);
        write(&mut m, Side::Upstream, Outcome::Reset, now);
        assert_eq!(
            m.state().name(),
            "piping",
            "the output is still owed to the client"
        );
        edge(&mut m, Side::Client, false, true, now);
        assert_eq!(m.write_buf(Side::Client), b"bye");
        write(&mut m, Side::Client, Outcome::Progress(3), now);
        read(&mut m, Side::Upstream, b"", now);
        assert_eq!(m.next_op(), Some(Op::ShutdownWrite(Side::Client)));
        answer(&mut m, Input::ShutDown { side: Side::Client }, now);
        assert_eq!(m.end(), Some(&End::Reset(Side::Upstream)));
        assert_eq!(m.bytes(), (0, 3));
    }

    #[test]
    fn test_piping_client_reset_on_read_ends_after_flush_upstream() {
        let now = Instant::now();
        let mut m = piping(now);
        read(&mut m, Side::Client, b"req", now);
        edge(&mut m, Side::Client, true, false, now);
        let outcome = Outcome::Reset;
        answer(
            &mut m,
            Input::Read {
                side: Side::Client,
                outcome,
            },
            now,
        );
        edge(&mut m, Side::Upstream, false, true, now);
        assert_eq!(
            m.write_buf(Side::Upstream),
            b"req",
            "bytes already read are delivered"
        );
        write(&mut m, Side::Upstream, Outcome::Progress(3), now);
        assert_eq!(m.next_op(), Some(Op::ShutdownWrite(Side::Upstream)));
        answer(
            &mut m,
            Input::ShutDown {
                side: Side::Upstream,
            },
            now,
        );
        assert_eq!(m.end(), Some(&End::Reset(Side::Client)));
    }

    #[test]
    fn test_piping_client_hangup_after_its_eof_ends_while_the_daemon_is_silent() {
        let now = Instant::now();
        let mut m = piping(now);
        read(&mut m, Side::Client, b"", now);
        answer(
            &mut m,
            Input::ShutDown {
                side: Side::Upstream,
            },
            now,
        );
        hangup(&mut m, Side::Client, now);
        assert_eq!(
            m.end(),
            Some(&End::Completed),
            "nothing was owed to the client"
        );
    }

    #[test]
    fn test_piping_client_hangup_with_output_owed_is_a_reset() {
        let now = Instant::now();
        let mut m = piping(now);
        read(&mut m, Side::Upstream, b"owed", now);
        hangup(&mut m, Side::Client, now);
        assert_eq!(
            m.state().name(),
            "piping",
            "the client may still have bytes to read"
        );
        read(&mut m, Side::Client, b"", now);
        answer(
            &mut m,
            Input::ShutDown {
                side: Side::Upstream,
            },
            now,
        );
        assert_eq!(m.end(), Some(&End::Reset(Side::Client)));
        assert_eq!(m.bytes(), (0, 0));
    }

    #[test]
    fn test_piping_hangup_after_our_own_shutdown_changes_nothing() {
        let now = Instant::now();
        let mut m = piping(now);
        read(&mut m, Side::Upstream, b"", now);
        answer(&mut m, Input::ShutDown { side: Side::Client }, now);
        // The client half-closed too: both directions of our socket are shut, which reads as
        // a hangup, yet the client may still be sending.
        hangup(&mut m, Side::Client, now);
        assert_eq!(m.state().name(), "piping");
        read(&mut m, Side::Client, b"late", now);
        edge(&mut m, Side::Upstream, false, true, now);
        assert_eq!(m.write_buf(Side::Upstream), b"late");
    }

    #[test]
    fn test_piping_failed_io_closes_at_once() {
        let now = Instant::now();
        let mut m = piping(now);
        answer(
            &mut m,
            Input::Read {
                side: Side::Upstream,
                outcome: Outcome::Failed(std::io::ErrorKind::OutOfMemory),
            },
            now,
        );
        assert!(matches!(m.end(), Some(End::Failed(Side::Upstream, _))));
    }

    #[test]
    fn test_piping_timeout_is_ignored_long_streams_never_expire() {
        let now = Instant::now();
        let mut m = piping(now);
        assert_eq!(m.deadline(), None);
        answer(&mut m, Input::Timeout, now + Duration::from_secs(86_400));
        assert_eq!(m.state().name(), "piping");
    }

    #[test]
    fn test_piping_idle_connection_holds_no_buffer() {
        let now = Instant::now();
        let mut m = piping(now);
        read(&mut m, Side::Client, b"x", now);
        assert_eq!(m.buffered_capacity(), 8);
        edge(&mut m, Side::Upstream, false, true, now);
        write(&mut m, Side::Upstream, Outcome::Progress(1), now);
        assert_eq!(m.buffered_capacity(), 0);
    }

    #[test]
    fn test_any_abort_closes() {
        let now = Instant::now();
        let mut m = piping(now);
        answer(&mut m, Input::Abort, now);
        assert_eq!(m.end(), Some(&End::Aborted));
        assert_eq!(m.next_op(), None);
    }

    /// Refuses a connection and returns it in the draining state.
    fn draining(refusal: Refusal, now: Instant) -> Machine {
        let mut m = Machine::new(1, settings(8));
        m.handle(Input::Identified(CRED), now);
        answer(&mut m, Input::Refused(refusal), now);
        m
    }

    fn reply_text(m: &Machine) -> String {
        String::from_utf8(m.write_buf(Side::Client).to_vec()).unwrap()
    }

    #[test]
    fn test_draining_reads_head_before_replying() {
        let now = Instant::now();
        let mut m = draining(not_running(), now);
        read(&mut m, Side::Client, b"GET /_ping HTTP/1.1\r\n", now);
        assert_eq!(
            m.next_op(),
            None,
            "head not complete: waits for more, no reply yet"
        );
        read(&mut m, Side::Client, b"\r\n", now);
        assert_eq!(m.next_op(), Some(Op::Write(Side::Client)));
        assert!(reply_text(&m).starts_with("HTTP/1.1 502 Bad Gateway\r\n"));
        assert!(reply_text(&m).contains("{\"message\""));
    }

    #[test]
    fn test_draining_head_request_gets_no_body() {
        let now = Instant::now();
        let mut m = draining(not_running(), now);
        read(&mut m, Side::Client, b"HEAD /_ping HTTP/1.1\n\n", now);
        let reply = reply_text(&m);
        assert!(reply.ends_with("\r\n\r\n"), "{reply}");
    }

    #[test]
    fn test_draining_reply_shutdown_linger_then_close() {
        let now = Instant::now();
        let mut m = draining(Refusal::LimitReached(Limit::PerUser(1)), now);
        read(&mut m, Side::Client, b"GET / HTTP/1.0\r\n\r\n", now);
        let len = m.write_buf(Side::Client).len();
        answer(
            &mut m,
            Input::Wrote {
                side: Side::Client,
                outcome: Outcome::Progress(len),
            },
            now,
        );
        assert_eq!(m.next_op(), Some(Op::ShutdownWrite(Side::Client)));
        answer(&mut m, Input::ShutDown { side: Side::Client }, now);
        assert!(
            matches!(m.state(), State::Draining(d) if d.phase == DrainPhase::Lingering),
            "lingers, discarding input"
        );
        read(&mut m, Side::Client, b"body bytes", now);
        read(&mut m, Side::Client, b"", now);
        assert!(matches!(m.end(), Some(End::Refused(r)) if r.status() == 503));
    }

    #[test]
    fn test_draining_silent_client_gets_reply_at_head_deadline_then_closes() {
        let now = Instant::now();
        let mut m = draining(not_running(), now);
        answer(
            &mut m,
            Input::Read {
                side: Side::Client,
                outcome: Outcome::WouldBlock,
            },
            now,
        );
        assert_eq!(m.next_op(), None);
        let head_deadline = m.deadline().unwrap();
        assert_eq!(head_deadline, now + Duration::from_secs(2));
        answer(&mut m, Input::Timeout, head_deadline);
        assert_eq!(m.next_op(), Some(Op::Write(Side::Client)));
        // The client never reads: the reply deadline closes it.
        answer(
            &mut m,
            Input::Wrote {
                side: Side::Client,
                outcome: Outcome::WouldBlock,
            },
            head_deadline,
        );
        let close_at = m.deadline().unwrap();
        assert_eq!(close_at, head_deadline + Duration::from_secs(1));
        answer(&mut m, Input::Timeout, close_at);
        assert!(m.is_closed());
    }

    #[test]
    fn test_draining_garbage_is_answered_at_once() {
        let now = Instant::now();
        let mut m = draining(
            Refusal::Forbidden {
                uid: 1000,
                path: "/p".into(),
                why: Forbidden::Symlink,
            },
            now,
        );
        read(&mut m, Side::Client, b"\x16\x03\x01\x00", now);
        assert_eq!(m.next_op(), Some(Op::Write(Side::Client)));
        assert!(reply_text(&m).starts_with("HTTP/1.1 403 Forbidden"));
    }

    #[test]
    fn test_draining_eof_before_head_still_replies_then_closes_without_linger() {
        let now = Instant::now();
        let mut m = draining(not_running(), now);
        read(&mut m, Side::Client, b"GET / HTTP/1.1\r\n", now);
        read(&mut m, Side::Client, b"", now);
        let len = m.write_buf(Side::Client).len();
        answer(
            &mut m,
            Input::Wrote {
                side: Side::Client,
                outcome: Outcome::Progress(len),
            },
            now,
        );
        answer(&mut m, Input::ShutDown { side: Side::Client }, now);
        assert!(m.is_closed());
    }

    #[test]
    fn test_draining_head_limit_replies_without_waiting_for_more() {
        let now = Instant::now();
        let mut m = draining(not_running(), now);
        let long = [b'a'; 64];
        let mut request = b"GET /".to_vec();
        request.extend_from_slice(&long);
        // The scratch buffer is larger than the head limit (64): one read decides.
        read(&mut m, Side::Client, &request, now);
        assert_eq!(m.next_op(), Some(Op::Write(Side::Client)));
    }

    #[test]
    fn test_resolving_refused_now_replies_after_one_read_and_closes_without_linger() {
        let now = Instant::now();
        let mut m = Machine::new(1, settings(8));
        m.handle(Input::Identified(CRED), now);
        answer(
            &mut m,
            Input::RefusedNow(Refusal::LimitReached(Limit::PerUser(1))),
            now,
        );
        assert_eq!(m.next_op(), Some(Op::Read(Side::Client)));
        assert_eq!(m.deadline(), Some(now + Duration::from_secs(1)));
        let outcome = Outcome::WouldBlock;
        answer(
            &mut m,
            Input::Read {
                side: Side::Client,
                outcome,
            },
            now,
        );
        assert_eq!(
            m.next_op(),
            Some(Op::Write(Side::Client)),
            "no waiting for a head"
        );
        let len = m.write_buf(Side::Client).len();
        write(&mut m, Side::Client, Outcome::Progress(len), now);
        assert_eq!(m.next_op(), Some(Op::ShutdownWrite(Side::Client)));
        answer(&mut m, Input::ShutDown { side: Side::Client }, now);
        assert!(matches!(m.end(), Some(End::Refused(r)) if r.status() == 503));
    }

    #[test]
    fn test_closed_ignores_everything() {
        let now = Instant::now();
        let mut m = piping(now);
        answer(&mut m, Input::Abort, now);
        for input in [
            Input::Timeout,
            Input::Ready {
                side: Side::Client,
                readable: true,
                writable: true,
                hangup: false,
            },
            Input::Connect(Connect::Connected),
            Input::Read {
                side: Side::Client,
                outcome: Outcome::Progress(1),
            },
        ] {
            answer(&mut m, input, now);
            assert_eq!(m.next_op(), None);
        }
    }
}
