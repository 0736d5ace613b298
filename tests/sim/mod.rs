//! A simulation harness for the connection state machine, shared by the property tests
//! (`tests/machine_model.rs`) and the fuzz target (`fuzz/fuzz_targets/conn_machine.rs`, which
//! includes this file with `#[path]`), so both drive the real `conn::machine::Machine` through
//! one harness.
//!
//! The harness plays the shell (`conn/mod.rs`): it asks `next_op`, performs the operation against
//! two simulated peers (the client and the user's daemon) and reports the result with `handle`,
//! with the same busy-loop rule as the shell (an answered operation must change the progress
//! marker). A [`Scenario`] scripts everything else: readiness edges (owed or spurious), read and
//! write sizes, `WouldBlock` at any point, short writes, end of stream and resets on either side,
//! time passing (a timer fires exactly when the machine's deadline passes), spurious timer
//! expiries and aborts. Each peer is a small kernel model: bytes it sent and the machine has not
//! read yet, its end of stream, its receive window, and the readiness edges it owes the machine.
//!
//! A reference model (the bytes each peer sent, the bytes each peer received, each side's
//! half-close state, and which peers the machine has seen gone) is checked after every step;
//! [`Sim::settle`] then lets both peers cooperate and requires the connection to end, with every
//! byte delivered. See `check` for the list.
//!
//! A gone peer (reset, broken pipe) ends only what involves it (machine invariant 5): the
//! direction towards it breaks and drops its queued bytes, the direction from it ends like an
//! end of stream after a read reset, and bytes already read from it are still delivered. Any
//! other I/O error closes the connection at once.

#![allow(dead_code)]

pub mod head_ref;
pub mod ring_ref;
pub mod values;

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::ErrorKind;
use std::time::{Duration, Instant};

use docker_socket_router::conn::half::{Half, Sink, Source};
use docker_socket_router::conn::machine::{
    Connect, DrainPhase, End, Input, Machine, Op, Settings, Side, State,
};
use docker_socket_router::head::HeadStatus;
use docker_socket_router::io::Outcome;
use docker_socket_router::peercred::PeerCred;
use docker_socket_router::reply::{Forbidden, Limit, Refusal};

/// Where the route plan refuses the connection, if it does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refuse {
    /// `Identify` fails (no peer credentials): 500.
    AtIdentify,
    /// `Route` refuses (limit, forbidden path, daemon missing).
    AtRoute,
    /// `Connect` fails after the busy answers (`ECONNREFUSED`): 502.
    AtConnect,
    /// The connection is piped (unless the busy answers outlast the connect timeout: 504).
    Never,
}

/// How the shell's `Identify`, `Route` and `Connect` are answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub refuse: Refuse,
    /// The refusal `Route` answers with (for [`Refuse::AtRoute`]).
    pub refusal: Refusal,
    /// How many `Connect` attempts answer `Busy` (a full backlog) before the final answer.
    pub busy: u16,
    /// `Route` refuses with `RefusedNow` (the user is far over their limit): reply after one
    /// read, close without lingering.
    pub hurried: bool,
}

/// One peer's script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerPlan {
    /// Everything the peer will send (unless it closes its write side early).
    pub data: Vec<u8>,
    /// The peer's receive window: bytes the machine may write before the peer reads them.
    pub window: usize,
}

/// One scripted step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The shell performs the machine's next operation (if any). `choice` and `size` pick the
    /// outcome: a spurious `WouldBlock` now and then, else a read or write of some size.
    Op { choice: u8, size: u8 },
    /// The shell drives the machine as `Connection::drive` does: up to 64 operations (with
    /// spurious `WouldBlock`s only when the top bit of `choice` is set).
    Drive { choice: u8, size: u8 },
    /// The peer puts up to `n` more bytes of its script into the socket.
    Send { side: Side, n: u8 },
    /// The peer reads up to `n` bytes of what the machine wrote to it.
    Consume { side: Side, n: u8 },
    /// The peer shuts down its write side: no more data, end of stream after what it sent.
    CloseWrite { side: Side },
    /// The peer goes away: every later read and write on that side fails (reset or error).
    Break { side: Side, reset: bool },
    /// A readiness edge from the poller, owed or spurious.
    Edge {
        side: Side,
        readable: bool,
        writable: bool,
    },
    /// Every edge the peers owe the machine is delivered.
    DeliverOwed,
    /// Time passes; the timer fires exactly when the machine's deadline passes, and the shell
    /// then drives the connection at once.
    Advance { ms: u16 },
    /// A timer fires at a time the machine did not ask for (a stale timer entry).
    SpuriousTimeout,
    /// The router's shutdown grace period is over.
    Abort,
}

/// A whole simulated connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scenario {
    pub settings: Settings,
    pub plan: Plan,
    pub client: PeerPlan,
    pub upstream: PeerPlan,
    pub steps: Vec<Step>,
}

/// Which total time bound the refusal path must honour, from the moment of the refusal. Every
/// timed phase must also end within its own timeout (head: `head_timeout`; reply, shutdown and
/// linger: `linger_timeout`), whatever this says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalBound {
    /// `head_timeout + linger_timeout`: one deadline for reply and linger together (the issue's
    /// wording, "within head_timeout + linger_timeout, however the client behaves").
    HeadPlusLinger,
    /// `head_timeout + 2 × linger_timeout`: the reply within `linger_timeout`, then at most
    /// `linger_timeout` of discarding after it (the README: "after the reply the router ...
    /// discards what the client still sends for at most 1 s").
    HeadPlusTwoLingers,
}

/// What the harness checks beyond the always-on properties.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    pub refusal_bound: RefusalBound,
}

/// The refusal bound the fuzz target and the property tests check: a refusal ends within
/// head timeout + linger timeout, however the client behaves (the reading).
pub const REFUSAL_BOUND: RefusalBound = RefusalBound::HeadPlusLinger;

impl Default for Options {
    fn default() -> Self {
        Options {
            refusal_bound: REFUSAL_BOUND,
        }
    }
}

/// What a finished simulation saw, for statistics in tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub end: End,
    pub ops: u64,
    pub bytes: (u64, u64),
    pub settle_rounds: usize,
}

/// Reads bytes for [`Scenario::decode`]; missing bytes read as zero.
struct Bytes<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        let byte = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        byte
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    fn is_empty(&self) -> bool {
        self.pos >= self.data.len()
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.u8()).collect()
    }

    fn side(&mut self) -> Side {
        if self.u8() & 1 == 0 {
            Side::Client
        } else {
            Side::Upstream
        }
    }
}

const METHODS: &[&[u8]] = &[
    b"GET",
    b"HEAD",
    b"POST",
    b"HEA",
    b"HEADX",
    b"H",
    b"\x16\x03",
    b"",
    b"PUT",
];

impl Scenario {
    /// Builds a scenario from arbitrary bytes (the fuzz input, or a proptest byte vector).
    /// Every input decodes to some scenario; the layout is a header, two peer scripts, then one
    /// step per one to three bytes.
    pub fn decode(data: &[u8]) -> Scenario {
        let mut b = Bytes { data, pos: 0 };
        let buffer_size = 1 + usize::from(b.u8() % 64);
        let head = b.u8();
        let head_limit = if head >= 224 {
            16 * 1024
        } else {
            usize::from(head % 64)
        };
        let connect_timeout = Duration::from_millis(1 + u64::from(b.u8() % 200));
        let head_timeout = Duration::from_millis(1 + u64::from(b.u8() % 200));
        let linger_timeout = Duration::from_millis(1 + u64::from(b.u8() % 200));
        let settings = Settings {
            buffer_size,
            connect_timeout,
            head_timeout,
            linger_timeout,
            head_limit,
        };
        let route = b.u8();
        let refuse = match route % 8 {
            0 => Refuse::AtIdentify,
            1 | 2 => Refuse::AtRoute,
            3 => Refuse::AtConnect,
            _ => Refuse::Never,
        };
        let refusal = match (route >> 3) % 4 {
            0 => Refusal::DaemonNotRunning {
                uid: 1000,
                path: "/run/user/1000/docker.sock".into(),
            },
            1 => Refusal::Forbidden {
                uid: 1000,
                path: "/run/user/1000/docker.sock".into(),
                why: Forbidden::WrongOwner,
            },
            2 => Refusal::LimitReached(Limit::PerUser(4)),
            _ => Refusal::Internal("simulated".into()),
        };
        let busy = match b.u8() {
            0..=127 => 0,
            n @ 128..=223 => u16::from(n % 8),
            _ => u16::MAX,
        };
        let client = PeerPlan {
            data: Self::decode_request(&mut b),
            window: 1 + usize::from(b.u8() % 64),
        };
        let upstream = PeerPlan {
            data: Self::decode_data(&mut b),
            window: 1 + usize::from(b.u8() % 64),
        };
        let mut steps = Vec::new();
        while !b.is_empty() {
            steps.push(Self::decode_step(&mut b));
        }
        Scenario {
            settings,
            plan: Plan {
                refuse,
                refusal,
                busy,
                hurried: route & 0x20 != 0,
            },
            client,
            upstream,
            steps,
        }
    }

    /// A peer's bytes: up to 95 bytes from the input, or now and then a long patterned stream
    /// (many ring wrap-arounds from a short input).
    fn decode_data(b: &mut Bytes<'_>) -> Vec<u8> {
        match b.u8() {
            len @ 0..=223 => {
                let len = usize::from(len % 96);
                b.bytes(len)
            }
            seed => (0..2000usize)
                .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
                .collect(),
        }
    }

    /// The client's bytes: raw bytes, or an HTTP-like request (so refusals see real heads).
    fn decode_request(b: &mut Bytes<'_>) -> Vec<u8> {
        let kind = b.u8();
        if kind.is_multiple_of(4) {
            return Self::decode_data(b);
        }
        let mut out = Vec::new();
        for _ in 0..(kind >> 2) % 3 {
            out.extend_from_slice(b"\r\n");
        }
        let method = METHODS[usize::from(b.u8()) % METHODS.len()];
        let eol: &[u8] = if kind & 0x20 == 0 { b"\r\n" } else { b"\n" };
        out.extend_from_slice(method);
        out.extend_from_slice(b" /_ping HTTP/1.1");
        out.extend_from_slice(eol);
        if kind & 0x40 == 0 {
            out.extend_from_slice(b"Host: docker");
            out.extend_from_slice(eol);
        }
        if kind & 0x80 == 0 {
            out.extend_from_slice(eol);
        }
        let body = usize::from(b.u8() % 48);
        out.extend(b.bytes(body));
        out
    }

    fn decode_step(b: &mut Bytes<'_>) -> Step {
        match b.u8() {
            0..=89 => Step::Op {
                choice: b.u8(),
                size: b.u8(),
            },
            90..=109 => Step::Drive {
                choice: b.u8(),
                size: b.u8(),
            },
            110..=139 => Step::Send {
                side: b.side(),
                n: b.u8(),
            },
            140..=164 => Step::Consume {
                side: b.side(),
                n: b.u8(),
            },
            165..=174 => Step::CloseWrite { side: b.side() },
            175..=199 => {
                let bits = b.u8();
                Step::Edge {
                    side: if bits & 1 == 0 {
                        Side::Client
                    } else {
                        Side::Upstream
                    },
                    readable: bits & 2 != 0,
                    writable: bits & 4 != 0,
                }
            }
            200..=219 => Step::DeliverOwed,
            220..=244 => Step::Advance {
                ms: u16::from(b.u8()),
            },
            245..=249 => Step::SpuriousTimeout,
            // Breaks and aborts end a run early: keep them rare (about 1 in 1000 and 1 in 5000).
            250..=253 => match b.u8() {
                bits @ 0..=15 => Step::Break {
                    side: if bits & 1 == 0 {
                        Side::Client
                    } else {
                        Side::Upstream
                    },
                    reset: bits & 2 == 0,
                },
                _ => Step::DeliverOwed,
            },
            254 => Step::DeliverOwed,
            255 => match b.u8() {
                0..=12 => Step::Abort,
                _ => Step::DeliverOwed,
            },
        }
    }
}

/// One simulated peer and the kernel state of its socket.
#[derive(Debug)]
struct Peer {
    /// What the peer sends; cut short when it closes its write side early.
    script: Vec<u8>,
    /// Bytes of the script put into the socket.
    sent: usize,
    /// Bytes of the script the machine has read.
    taken: usize,
    /// The peer shut down its write side (after `sent` bytes).
    eof: bool,
    /// The machine has read that end of stream.
    eof_read: bool,
    /// The peer is gone: writes answer this; reads answer it once the bytes are gone (or at
    /// once, as a reset may drop them).
    broken: Option<Outcome>,
    /// The machine has seen this peer gone (a reset on a read or write while piping).
    gone_seen: bool,
    /// The machine's read from this peer answered a reset: its direction ended there.
    read_reset: bool,
    window: usize,
    /// Bytes the machine wrote that the peer has not read yet (at most `window`).
    inbox: usize,
    /// Every byte the machine wrote to this peer, in order.
    received: Vec<u8>,
    /// The machine shut down its write side towards this peer.
    shut: bool,
    /// Readiness edges this socket owes the machine (new data, new room, a state change).
    owed_read: bool,
    owed_write: bool,
    /// The socket exists (the upstream only after `Connect` succeeded).
    active: bool,
}

impl Peer {
    fn new(plan: &PeerPlan, active: bool) -> Peer {
        Peer {
            script: plan.data.clone(),
            sent: 0,
            taken: 0,
            eof: false,
            eof_read: false,
            broken: None,
            gone_seen: false,
            read_reset: false,
            window: plan.window,
            inbox: 0,
            received: Vec::new(),
            shut: false,
            owed_read: false,
            owed_write: false,
            active,
        }
    }

    /// A read on this socket would return something other than `WouldBlock`.
    fn kernel_readable(&self) -> bool {
        self.broken.is_some() || self.sent > self.taken || self.eof
    }

    /// A write on this socket would return something other than `WouldBlock`.
    fn kernel_writable(&self) -> bool {
        self.broken.is_some() || self.inbox < self.window
    }
}

fn index(side: Side) -> usize {
    match side {
        Side::Client => 0,
        Side::Upstream => 1,
    }
}

/// The simulation: the real machine, two peers, a clock, and the reference model's memory.
pub struct Sim {
    machine: Machine,
    settings: Settings,
    plan: Plan,
    options: Options,
    start: Instant,
    now: Instant,
    peers: [Peer; 2],
    busy_left: u16,
    connecting_since: Option<Instant>,
    refused_at: Option<Instant>,
    /// When the current refusal phase began, and which phase it is.
    phase_since: Option<(DrainPhase, Instant)>,
    /// The reference's view of the head read so far, for that many client bytes.
    head_cache: Option<(usize, head_ref::Expected)>,
    /// The reply the client must receive, fixed when the machine stops reading the head.
    expected_reply: Option<Vec<u8>>,
    /// How the connection ended, once it did.
    ended: Option<End>,
    /// The machine left the admitted states (the shell then gave its admission back).
    left_admission: bool,
    /// The connection reached `Piping`.
    piped: bool,
    /// Reads answered while refusing.
    drain_reads: u32,
    /// Per direction (by source): operations of the other direction while this one had work.
    starved: [u32; 2],
    /// The first peer the machine saw gone, and a hard I/O error it was told about.
    first_gone: Option<Side>,
    failed: Option<(Side, ErrorKind)>,
    aborted: bool,
    ops: u64,
    trace: VecDeque<(u128, Event, &'static str)>,
}

/// One line of the failure trace (formatted only when a property fails).
#[derive(Debug, Clone)]
enum Event {
    Break(Side, bool),
    SpuriousTimeout,
    Abort,
    Sends(Side, usize),
    Reads(Side, usize),
    CloseWrite(Side),
    Edge(Side, bool, bool),
    TimerFires,
    Answer(Op, Input),
    Settle,
}

impl std::fmt::Display for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Event::Break(side, reset) => write!(f, "{side:?} peer breaks (reset={reset})"),
            Event::SpuriousTimeout => f.write_str("spurious timeout"),
            Event::Abort => f.write_str("abort"),
            Event::Sends(side, sent) => write!(f, "{side:?} peer sends up to byte {sent}"),
            Event::Reads(side, n) => write!(f, "{side:?} peer reads {n} bytes"),
            Event::CloseWrite(side) => write!(f, "{side:?} peer shuts down its write side"),
            Event::Edge(side, r, w) => write!(f, "edge {side:?} r={r} w={w}"),
            Event::TimerFires => f.write_str("timer fires"),
            Event::Answer(op, input) => write!(f, "{op:?} -> {input:?}"),
            Event::Settle => f.write_str("--- settle ---"),
        }
    }
}

/// Operations the quiescence phase may take before it calls the connection hung.
const SETTLE_OPS: usize = 100_000;
/// The shell's per-drive budget (`conn::STEP_BUDGET`).
const DRIVE_BUDGET: usize = 64;
const TRACE_LEN: usize = 48;
/// How many operations of one direction the other, with work waiting, may sit through.
const FAIRNESS: u32 = 2;

impl Sim {
    pub fn new(scenario: &Scenario, options: Options) -> Sim {
        let start = Instant::now();
        Sim {
            machine: Machine::new(1, scenario.settings),
            settings: scenario.settings,
            plan: scenario.plan.clone(),
            options,
            start,
            now: start,
            peers: [
                Peer::new(&scenario.client, true),
                Peer::new(&scenario.upstream, false),
            ],
            busy_left: scenario.plan.busy,
            connecting_since: None,
            refused_at: None,
            phase_since: None,
            head_cache: None,
            expected_reply: None,
            ended: None,
            left_admission: false,
            piped: false,
            drain_reads: 0,
            starved: [0, 0],
            first_gone: None,
            failed: None,
            aborted: false,
            ops: 0,
            trace: VecDeque::new(),
        }
    }

    pub fn machine(&self) -> &Machine {
        &self.machine
    }

    fn peer(&self, side: Side) -> &Peer {
        &self.peers[index(side)]
    }

    fn peer_mut(&mut self, side: Side) -> &mut Peer {
        &mut self.peers[index(side)]
    }

    fn note(&mut self, event: Event) {
        if self.trace.len() == TRACE_LEN {
            self.trace.pop_front();
        }
        let at = self.now.duration_since(self.start).as_millis();
        self.trace
            .push_back((at, event, self.machine.state().name()));
    }

    /// A failure message with the recent history and the machine's full state.
    fn fail(&self, what: impl std::fmt::Display) -> String {
        let mut text = format!("PROPERTY VIOLATED: {what}\nrecent steps:\n");
        for (at, event, state) in &self.trace {
            let _ = writeln!(text, "  t={at}ms {event} | {state}");
        }
        let _ = write!(
            text,
            "machine: {:?}\nclient: {:?}\nupstream: {:?}",
            self.machine, self.peers[0], self.peers[1]
        );
        text
    }

    /// Decodes a fuzz input (see [`Scenario::decode`]) and runs it with the default options.
    pub fn check_input(data: &[u8]) -> Result<Report, String> {
        let scenario = Scenario::decode(data);
        Sim::run(&scenario, Options::default())
            .map_err(|violation| format!("{violation}\nscenario: {scenario:?}"))
    }

    /// Runs every step, then the quiescence phase; `Err` describes the first violated property.
    pub fn run(scenario: &Scenario, options: Options) -> Result<Report, String> {
        let mut sim = Sim::new(scenario, options);
        sim.check()?;
        for &step in &scenario.steps {
            sim.step(step)?;
        }
        let settle_rounds = sim.settle()?;
        sim.after_end()?;
        Ok(Report {
            end: sim.ended.clone().unwrap_or(End::Aborted),
            ops: sim.ops,
            bytes: sim.machine.bytes(),
            settle_rounds,
        })
    }

    pub fn step(&mut self, step: Step) -> Result<(), String> {
        match step {
            Step::Op { choice, size } => {
                self.op(choice, size, false)?;
            }
            Step::Drive { choice, size } => {
                for i in 0..DRIVE_BUDGET {
                    // A drive has spurious `WouldBlock`s only when the top bit of `choice` says so.
                    let choice = if choice & 0x80 == 0 {
                        choice & 0x78
                    } else {
                        choice.wrapping_add((i as u8).wrapping_mul(37))
                    };
                    let size = size.wrapping_add((i as u8).wrapping_mul(11));
                    if !self.op(choice, size, false)? {
                        break;
                    }
                }
            }
            Step::Send { side, n } => self.send(side, usize::from(n)),
            Step::Consume { side, n } => self.consume(side, usize::from(n)),
            Step::CloseWrite { side } => self.close_write(side),
            Step::Break { side, reset } => {
                let peer = self.peer_mut(side);
                if peer.active && peer.broken.is_none() {
                    peer.broken = Some(if reset {
                        Outcome::Reset
                    } else {
                        Outcome::Failed(ErrorKind::Other)
                    });
                    peer.owed_read = true;
                    peer.owed_write = true;
                    self.note(Event::Break(side, reset));
                }
            }
            Step::Edge {
                side,
                readable,
                writable,
            } => self.edge(side, readable, writable),
            Step::DeliverOwed => self.deliver_owed(),
            Step::Advance { ms } => {
                self.advance(self.now + Duration::from_millis(u64::from(ms)))?
            }
            Step::SpuriousTimeout => {
                self.note(Event::SpuriousTimeout);
                self.machine.handle(Input::Timeout, self.now);
            }
            Step::Abort if self.machine.is_closed() => {
                // The daemon frees a closed connection at once: nothing can abort it.
            }
            Step::Abort => {
                self.note(Event::Abort);
                self.aborted = true;
                self.machine.handle(Input::Abort, self.now);
                if !self.machine.is_closed() {
                    return Err(self.fail("Abort did not close the connection"));
                }
            }
        }
        self.check()
    }

    fn send(&mut self, side: Side, n: usize) {
        let peer = self.peer_mut(side);
        if !peer.active || peer.eof || peer.broken.is_some() {
            return;
        }
        let sent = peer.sent.saturating_add(n).min(peer.script.len());
        if sent > peer.sent {
            peer.sent = sent;
            peer.owed_read = true;
            self.note(Event::Sends(side, sent));
        }
    }

    fn consume(&mut self, side: Side, n: usize) {
        let peer = self.peer_mut(side);
        if peer.broken.is_some() {
            return;
        }
        let n = n.min(peer.inbox);
        if n > 0 {
            peer.inbox -= n;
            peer.owed_write = true;
            self.note(Event::Reads(side, n));
        }
    }

    fn close_write(&mut self, side: Side) {
        let peer = self.peer_mut(side);
        if !peer.active || peer.eof || peer.broken.is_some() {
            return;
        }
        peer.eof = true;
        peer.script.truncate(peer.sent);
        peer.owed_read = true;
        self.note(Event::CloseWrite(side));
    }

    fn edge(&mut self, side: Side, readable: bool, writable: bool) {
        let peer = self.peer_mut(side);
        if !peer.active {
            return; // no socket, no token, no event
        }
        if readable {
            peer.owed_read = false;
        }
        if writable {
            peer.owed_write = false;
        }
        self.note(Event::Edge(side, readable, writable));
        self.machine.handle(
            Input::Ready {
                side,
                readable,
                writable,
                hangup: false,
            },
            self.now,
        );
    }

    fn deliver_owed(&mut self) {
        for side in [Side::Client, Side::Upstream] {
            let peer = self.peer(side);
            let (readable, writable) = (peer.owed_read, peer.owed_write);
            if readable || writable {
                self.edge(side, readable, writable);
            }
        }
    }

    /// Time passes up to `until`; like the shell's timer, a timeout fires at each deadline.
    fn advance(&mut self, until: Instant) -> Result<(), String> {
        for _ in 0..16 {
            match self.machine.deadline() {
                Some(deadline) if deadline <= until => {
                    self.now = self.now.max(deadline);
                    self.note(Event::TimerFires);
                    self.machine.handle(Input::Timeout, self.now);
                    if self.machine.deadline().is_some_and(|next| next <= self.now) {
                        return Err(self.fail(format!(
                            "a fired timer left the deadline at or before now ({:?}): the \
                             shell's timer loop would spin",
                            self.machine
                                .deadline()
                                .map(|d| d.duration_since(self.start))
                        )));
                    }
                    self.check()?;
                    // The shell drives a connection right after its timer fires.
                    for i in 0..DRIVE_BUDGET {
                        if !self.op(0, (i as u8).wrapping_mul(29), false)? {
                            break;
                        }
                    }
                }
                _ => {
                    self.now = until;
                    return Ok(());
                }
            }
        }
        Err(self.fail("more than 16 timer expiries within one time step"))
    }

    /// Performs the machine's next operation, like one iteration of `Connection::drive`.
    /// Returns whether there was one.
    fn op(&mut self, choice: u8, size: u8, greedy: bool) -> Result<bool, String> {
        let Some(op) = self.machine.next_op() else {
            return Ok(false);
        };
        self.ops += 1;
        self.check_fair(op)?;
        let before = self.machine.progress_marker();
        let input = self.perform(op, choice, size, greedy)?;
        self.note(Event::Answer(op, input.clone()));
        let was_piping = matches!(self.machine.state(), State::Piping { .. });
        if matches!(self.machine.state(), State::Draining(_)) && matches!(input, Input::Read { .. })
        {
            self.drain_reads += 1;
        }
        let (side, outcome) = match input {
            Input::Read { side, outcome } | Input::Wrote { side, outcome } => (side, Some(outcome)),
            _ => (Side::Client, None),
        };
        let is_write = matches!(input, Input::Wrote { .. });
        // Piping: any error but a reset closes at once; a reset (or a write's EOF) marks the peer
        // gone. Draining: any error ends the refusal.
        let closes_now = match outcome {
            Some(Outcome::Failed(_)) => true,
            Some(Outcome::Reset) => !was_piping,
            Some(Outcome::Eof) => is_write && !was_piping,
            _ => false,
        };
        if was_piping {
            match outcome {
                Some(Outcome::Failed(kind)) => self.failed = Some((side, kind)),
                Some(Outcome::Reset) | Some(Outcome::Eof) if is_write => {
                    self.peer_mut(side).gone_seen = true;
                    self.first_gone.get_or_insert(side);
                }
                Some(Outcome::Reset) => {
                    let peer = self.peer_mut(side);
                    peer.gone_seen = true;
                    peer.read_reset = true;
                    self.first_gone.get_or_insert(side);
                }
                _ => {}
            }
        }
        self.machine.handle(input.clone(), self.now);
        if self.machine.progress_marker() == before {
            return Err(self.fail(format!(
                "{op:?} answered with {input:?} changed nothing: the shell would call this a \
                 busy loop"
            )));
        }
        if closes_now && !self.machine.is_closed() {
            return Err(self.fail(format!("{input:?} did not close the connection at once")));
        }
        if closes_now && was_piping {
            let end = self.machine.end().cloned();
            if let (Some(End::Failed(s, k)), Some((want_side, want_kind))) = (&end, self.failed) {
                if (*s, *k) != (want_side, want_kind) {
                    return Err(self.fail(format!("ended as {end:?} after {input:?}")));
                }
            } else {
                return Err(self.fail(format!("ended as {end:?} after {input:?}")));
            }
        }
        self.check()?;
        // The shell's drive loop goes on at the same instant; a refusal's shutdown needs no
        // readiness, so it always follows in the same drive.
        if self.machine.next_op() == Some(Op::ShutdownWrite(Side::Client))
            && matches!(self.machine.state(), State::Draining(_))
        {
            self.op(choice, size, greedy)?;
        }
        Ok(true)
    }

    /// Picks how many of `available` bytes move: a random share, or all when greedy.
    fn amount(available: usize, size: u8, greedy: bool) -> usize {
        if greedy {
            available
        } else {
            1 + usize::from(size) % available
        }
    }

    fn perform(&mut self, op: Op, choice: u8, size: u8, greedy: bool) -> Result<Input, String> {
        let choice = if greedy { 0x10 } else { choice };
        let spurious = !greedy && choice % 8 == 7;
        let state = self.machine.state().name();
        match op {
            Op::Identify => {
                if state != "accepted" {
                    return Err(self.fail("Identify asked outside Accepted"));
                }
                Ok(if self.plan.refuse == Refuse::AtIdentify {
                    Input::Refused(Refusal::Internal("cannot read the peer credentials".into()))
                } else {
                    Input::Identified(PeerCred {
                        uid: 1000,
                        gid: 1000,
                        pid: 42,
                    })
                })
            }
            Op::Route => {
                if state != "resolving" {
                    return Err(self.fail("Route asked outside Resolving"));
                }
                Ok(
                    if self.plan.refuse == Refuse::AtRoute && self.plan.hurried {
                        Input::RefusedNow(self.plan.refusal.clone())
                    } else if self.plan.refuse == Refuse::AtRoute {
                        Input::Refused(self.plan.refusal.clone())
                    } else {
                        self.connecting_since = Some(self.now);
                        Input::Routed {
                            upstream: "/run/user/1000/docker.sock".into(),
                        }
                    },
                )
            }
            Op::Connect => {
                if state != "connecting" {
                    return Err(self.fail("Connect asked outside Connecting"));
                }
                if self.busy_left > 0 {
                    self.busy_left -= 1;
                    return Ok(Input::Connect(Connect::Busy));
                }
                if self.plan.refuse == Refuse::AtConnect {
                    return Ok(Input::Connect(Connect::Failed(Refusal::DaemonNotRunning {
                        uid: 1000,
                        path: "/run/user/1000/docker.sock".into(),
                    })));
                }
                self.peer_mut(Side::Upstream).active = true;
                Ok(Input::Connect(Connect::Connected))
            }
            Op::Read(side) => self.perform_read(side, choice, size, greedy),
            Op::Write(side) => self.perform_write(side, spurious, size, greedy),
            Op::ShutdownWrite(side) => {
                self.check_shutdown_allowed(side)?;
                let peer = self.peer_mut(side);
                peer.shut = true;
                Ok(Input::ShutDown { side })
            }
        }
    }

    fn perform_read(
        &mut self,
        side: Side,
        choice: u8,
        size: u8,
        greedy: bool,
    ) -> Result<Input, String> {
        let spurious = !greedy && choice % 8 == 7;
        // What may be read: room in the ring (piping) or the refusal's scratch buffer.
        let room = match self.machine.state() {
            State::Piping {
                to_upstream,
                to_client,
                ..
            } => {
                let half = if side == Side::Client {
                    to_upstream
                } else {
                    to_client
                };
                if half.source != Source::Open || self.peer(side).eof_read {
                    return Err(self.fail(format!("reads {side:?} after its end of stream")));
                }
                if self.peer(side.other()).gone_seen {
                    return Err(self.fail(format!(
                        "reads {side:?} although {:?}, where its bytes would go, is gone",
                        side.other()
                    )));
                }
                let queued = self.queued(side);
                if queued >= self.settings.buffer_size {
                    return Err(self.fail(format!(
                        "reads {side:?} while its direction's buffer is full ({queued} bytes)"
                    )));
                }
                self.settings.buffer_size - queued
            }
            State::Draining(drain) => {
                if side != Side::Client
                    || !matches!(drain.phase, DrainPhase::ReadingHead | DrainPhase::Lingering)
                {
                    return Err(self.fail(format!("a refusal reads {side:?} in {:?}", drain.phase)));
                }
                usize::MAX
            }
            _ => return Err(self.fail(format!("reads {side:?} before any socket is ready"))),
        };
        // Like the shell, take the buffer first (this is what allocates a ring).
        let requested = self.machine.read_buf(side).len();
        if requested == 0 {
            return Err(self.fail(format!("read {side:?} offered an empty buffer")));
        }
        if requested > room {
            return Err(self.fail(format!("read buffer {requested} bytes > {room} free")));
        }
        let peer = &self.peers[index(side)];
        if !peer.active {
            return Err(self.fail(format!("reads {side:?}, which has no socket")));
        }
        let available = peer.sent - peer.taken;
        // A reset peer's bytes may still be read (a close) or lost (a reset drops them).
        if let Some(outcome) = peer.broken
            && (available == 0 || choice & 0x10 == 0 || outcome != Outcome::Reset)
        {
            return Ok(Input::Read { side, outcome });
        }
        let readable = available > 0 || peer.eof;
        if !readable || (spurious && peer.broken.is_none()) {
            if readable {
                // Lost a race with arriving data: the edge for it comes later.
                self.peer_mut(side).owed_read = true;
            }
            return Ok(Input::Read {
                side,
                outcome: Outcome::WouldBlock,
            });
        }
        if available == 0 {
            self.peer_mut(side).eof_read = true;
            return Ok(Input::Read {
                side,
                outcome: Outcome::Eof,
            });
        }
        let taken = peer.taken;
        let n = Self::amount(available.min(requested), size, greedy);
        let bytes = &self.peers[index(side)].script[taken..taken + n];
        self.machine.read_buf(side)[..n].copy_from_slice(bytes);
        self.peer_mut(side).taken += n;
        Ok(Input::Read {
            side,
            outcome: Outcome::Progress(n),
        })
    }

    fn perform_write(
        &mut self,
        side: Side,
        spurious: bool,
        size: u8,
        greedy: bool,
    ) -> Result<Input, String> {
        let buf = self.machine.write_buf(side).to_vec();
        if buf.is_empty() {
            return Err(self.fail(format!("write {side:?} with nothing to write")));
        }
        let peer = self.peer(side);
        if !peer.active {
            return Err(self.fail(format!("writes {side:?}, which has no socket")));
        }
        if peer.shut {
            return Err(self.fail(format!("writes {side:?} after shutting it down")));
        }
        if peer.gone_seen {
            return Err(self.fail(format!("writes {side:?} after seeing it gone")));
        }
        // The bytes offered must be exactly the next ones the peer is owed.
        let received = peer.received.len();
        match self.machine.state() {
            State::Piping { .. } => {
                let source = self.peer(side.other());
                let queued = &source.script[received.min(source.taken)..source.taken];
                if buf.len() > queued.len() || buf[..] != queued[..buf.len()] {
                    return Err(self.fail(format!(
                        "offers {:?} to {side:?}, but the bytes owed next are {:?}",
                        buf, queued
                    )));
                }
            }
            State::Draining(drain) => {
                if side != Side::Client || drain.phase != DrainPhase::Replying {
                    return Err(
                        self.fail(format!("a refusal writes {side:?} in {:?}", drain.phase))
                    );
                }
                let expected = self.reply_expected()?;
                if expected.get(received..) != Some(&buf[..]) {
                    return Err(self.fail(format!(
                        "reply bytes from {received} are {:?}, want {:?}",
                        String::from_utf8_lossy(&buf),
                        String::from_utf8_lossy(expected.get(received..).unwrap_or(&[]))
                    )));
                }
            }
            _ => return Err(self.fail(format!("writes {side:?} before any socket is ready"))),
        }
        if let Some(outcome) = peer.broken {
            return Ok(Input::Wrote { side, outcome });
        }
        let room = peer.window - peer.inbox;
        if room == 0 || spurious {
            if room > 0 {
                self.peer_mut(side).owed_write = true;
            }
            return Ok(Input::Wrote {
                side,
                outcome: Outcome::WouldBlock,
            });
        }
        let n = Self::amount(room.min(buf.len()), size, greedy);
        let peer = self.peer_mut(side);
        peer.received.extend_from_slice(&buf[..n]);
        peer.inbox += n;
        Ok(Input::Wrote {
            side,
            outcome: Outcome::Progress(n),
        })
    }

    fn check_shutdown_allowed(&self, side: Side) -> Result<(), String> {
        let peer = self.peer(side);
        if peer.shut {
            return Err(self.fail(format!("shuts down {side:?} twice")));
        }
        match self.machine.state() {
            State::Piping { .. } => {
                let source = self.peer(side.other());
                if !(source.eof_read || source.read_reset) || peer.gone_seen {
                    return Err(self.fail(format!(
                        "shuts down {side:?} before {:?} ended, or after {side:?} was gone",
                        side.other()
                    )));
                }
                let all = if source.eof_read {
                    source.script.len()
                } else {
                    source.taken
                };
                if peer.received.len() != source.taken || source.taken != all {
                    return Err(self.fail(format!(
                        "shuts down {side:?} after {} of {} bytes",
                        peer.received.len(),
                        source.script.len()
                    )));
                }
            }
            State::Draining(drain) => {
                let expected = self.reply_expected()?;
                if side != Side::Client
                    || drain.phase != DrainPhase::ShuttingDown
                    || peer.received != expected
                {
                    return Err(self.fail(format!(
                        "a refusal shuts down {side:?} in {:?} after {} of {} reply bytes",
                        drain.phase,
                        peer.received.len(),
                        expected.len()
                    )));
                }
            }
            _ => return Err(self.fail(format!("shuts down {side:?} before any socket is ready"))),
        }
        Ok(())
    }

    fn reply_expected(&self) -> Result<Vec<u8>, String> {
        self.expected_reply
            .clone()
            .ok_or_else(|| self.fail("a reply is written before the head phase ended"))
    }

    /// Bytes read from `source` and not yet written to the other side.
    fn queued(&self, source: Side) -> usize {
        let taken = self.peer(source).taken;
        let delivered = self.peer(source.other()).received.len();
        taken.saturating_sub(delivered)
    }

    /// The properties that must hold after every step.
    fn check(&mut self) -> Result<(), String> {
        if let Err(broken) = self.machine.check_invariants() {
            return Err(self.fail(format!("check_invariants: {broken}")));
        }
        // The shell gives the admission back once the machine leaves the admitted states; it
        // must never need it again (or the limit count would drift).
        if self.machine.is_admitted_state() {
            if self.left_admission {
                return Err(self.fail("back in an admitted state after giving it up"));
            }
        } else {
            self.left_admission = true;
        }
        if matches!(self.machine.state(), State::Piping { .. }) {
            self.piped = true;
        }
        if let Some(end) = &self.ended
            && self.machine.end() != Some(end)
        {
            return Err(self.fail(format!(
                "a closed connection changed: {end:?} -> {:?}",
                self.machine.end()
            )));
        }
        match self.machine.state() {
            State::Closed(end) => {
                let end = end.clone();
                self.check_closed(&end)?;
                self.ended = Some(end);
            }
            State::Connecting {
                deadline, started, ..
            } => {
                let since = self.connecting_since.unwrap_or(*started);
                if *deadline != since + self.settings.connect_timeout {
                    return Err(
                        self.fail("the connect deadline is not connect_timeout after Route")
                    );
                }
                if self.now >= *deadline {
                    return Err(self.fail("still connecting after the connect deadline"));
                }
            }
            State::Piping {
                to_upstream,
                to_client,
                ..
            } => self.check_piping(to_upstream, to_client)?,
            State::Draining(_) => self.check_draining()?,
            State::Accepted | State::Resolving => {}
        }
        self.check_not_stuck()
    }

    fn check_closed(&self, end: &End) -> Result<(), String> {
        if self.machine.next_op().is_some() || self.machine.deadline().is_some() {
            return Err(self.fail("a closed connection still asks for work or a timer"));
        }
        if self.machine.buffered_capacity() != 0 {
            return Err(self.fail("a closed connection holds buffers"));
        }
        let [client, upstream] = &self.peers;
        // The byte counts of the log line survive the end.
        let counted = (upstream.received.len() as u64, client.received.len() as u64);
        if self.piped && self.machine.bytes() != counted {
            return Err(self.fail(format!(
                "bytes() = {:?} after the end, the model {counted:?}",
                self.machine.bytes()
            )));
        }
        match end {
            End::Completed => {
                // Both directions finished: everything each peer sent reached the other.
                if !(client.shut && upstream.shut && client.eof_read && upstream.eof_read) {
                    return Err(self.fail("completed before both directions passed end of stream"));
                }
                if upstream.received != client.script || client.received != upstream.script {
                    return Err(self.fail("completed without delivering every byte"));
                }
                if self.first_gone.is_some() {
                    return Err(self.fail("completed although a peer was gone"));
                }
            }
            End::Reset(side) => {
                if self.first_gone != Some(*side) {
                    return Err(self.fail(format!(
                        "ended as {end:?}, but the first peer seen gone is {:?}",
                        self.first_gone
                    )));
                }
                // Both directions finished; what was read from a peer reached the other one
                // unless that one was gone.
                for (source, sink) in [(client, upstream), (upstream, client)] {
                    if !(sink.shut || sink.gone_seen) {
                        return Err(self.fail("ended with a direction still open"));
                    }
                    if !sink.gone_seen && sink.received.len() != source.taken {
                        return Err(self.fail("ended before delivering bytes already read"));
                    }
                }
            }
            End::Failed(side, kind) if self.failed != Some((*side, *kind)) => {
                return Err(self.fail(format!("ended as {end:?} without that error")));
            }
            End::Aborted if !self.aborted => {
                return Err(self.fail("aborted without an Abort"));
            }
            End::Refused(refusal) => {
                if let Some(expected) = &self.expected_reply {
                    if !expected.starts_with(&client.received) {
                        return Err(self.fail("the client got something other than the reply"));
                    }
                    if client.shut && client.received != *expected {
                        return Err(self.fail("shut down before the whole reply was written"));
                    }
                }
                self.check_refusal(refusal)?;
            }
            _ => {}
        }
        Ok(())
    }

    fn check_refusal(&self, refusal: &Refusal) -> Result<(), String> {
        let status = refusal.status();
        let want = match self.plan.refuse {
            Refuse::AtIdentify => 500,
            Refuse::AtRoute => self.plan.refusal.status(),
            _ if matches!(refusal, Refusal::ConnectTimeout { .. }) => 504,
            Refuse::AtConnect => 502,
            Refuse::Never => 0,
        };
        if status != want {
            return Err(self.fail(format!("refused with {status}, want {want}")));
        }
        if let Refusal::ConnectTimeout { waited, .. } = refusal
            && *waited < self.settings.connect_timeout
        {
            return Err(self.fail(format!("504 after waiting only {waited:?}")));
        }
        Ok(())
    }

    fn check_piping(&self, to_upstream: &Half, to_client: &Half) -> Result<(), String> {
        let cap = self.settings.buffer_size;
        for (half, source) in [(to_upstream, Side::Client), (to_client, Side::Upstream)] {
            let sink = source.other();
            let (src, dst) = (self.peer(source), self.peer(sink));
            // Each write was checked against the next bytes owed (`perform_write`), so the
            // received bytes are a prefix of what the source sent; here only the count.
            if dst.received.len() > src.taken {
                return Err(self.fail(format!(
                    "{sink:?} received {} bytes, more than the {} read from {source:?}",
                    dst.received.len(),
                    src.taken
                )));
            }
            let queued = if dst.gone_seen {
                0 // dropped: nowhere to go
            } else {
                src.taken - dst.received.len()
            };
            if half.ring.len() != queued || half.ring.capacity() != cap {
                return Err(self.fail(format!(
                    "{source:?}->{sink:?} ring holds {} of {}, the model {queued} of {cap}",
                    half.ring.len(),
                    half.ring.capacity()
                )));
            }
            if half.delivered != dst.received.len() as u64 {
                return Err(self.fail(format!(
                    "{source:?}->{sink:?} counts {} delivered, the model {}",
                    half.delivered,
                    dst.received.len()
                )));
            }
            let want_sink = if dst.gone_seen {
                Sink::Broken
            } else if dst.shut {
                Sink::ShutdownSent
            } else {
                Sink::Open
            };
            if (half.source == Source::Eof) != (src.eof_read || src.read_reset)
                || half.sink != want_sink
            {
                return Err(self.fail(format!(
                    "{source:?}->{sink:?} half-close {:?}/{:?}, the model: eof_read={} \
                     read_reset={} shut={} gone={}",
                    half.source, half.sink, src.eof_read, src.read_reset, dst.shut, dst.gone_seen
                )));
            }
            // An idle direction holds no buffer (the README's memory promise).
            if self.machine.next_op().is_none() && half.ring.is_empty() && half.ring.is_allocated()
            {
                return Err(self.fail(format!(
                    "idle {source:?}->{sink:?} direction still holds its buffer"
                )));
            }
        }
        let [client, upstream] = &self.peers;
        if (client.shut || client.gone_seen) && (upstream.shut || upstream.gone_seen) {
            return Err(self.fail("both directions finished, yet still piping"));
        }
        let (up, down) = self.machine.bytes();
        if (up, down) != (upstream.received.len() as u64, client.received.len() as u64) {
            return Err(self.fail(format!(
                "bytes() = {:?} disagrees with the model",
                (up, down)
            )));
        }
        if self.machine.buffered_capacity() > 2 * cap {
            return Err(self.fail("holds more than two buffers"));
        }
        if self.machine.deadline().is_some() {
            return Err(
                self.fail("a piped connection has a deadline (long streams must not time out)")
            );
        }
        Ok(())
    }

    fn check_draining(&mut self) -> Result<(), String> {
        let State::Draining(drain) = self.machine.state() else {
            return Ok(());
        };
        let phase = drain.phase;
        let refused_at = *self.refused_at.get_or_insert(self.now);
        let client = &self.peers[0];
        let head = match self.head_cache {
            Some((taken, head)) if taken == client.taken => head,
            _ => {
                let head =
                    head_ref::expect(&client.script[..client.taken], self.settings.head_limit);
                self.head_cache = Some((client.taken, head));
                head
            }
        };
        let hurried = self.plan.hurried && self.plan.refuse == Refuse::AtRoute;
        // A hurried refusal waits for no head: its first deadline is the linger timeout.
        let head_timeout = if hurried {
            self.settings.linger_timeout
        } else {
            self.settings.head_timeout
        };
        let head_timeout_passed = self.now >= refused_at + head_timeout;
        if phase == DrainPhase::ReadingHead {
            if head.status.is_decided() {
                return Err(self.fail(format!(
                    "still reading a head that is decided ({:?} after {} bytes)",
                    head.status, head.seen
                )));
            }
            if drain.head.status() != HeadStatus::Incomplete
                || drain.head.bytes_seen() != client.taken
            {
                return Err(self.fail("the head reader saw other bytes than the client sent"));
            }
        } else if self.expected_reply.is_none() {
            // The head phase just ended: it must have had a reason (a hurried refusal replies
            // after its first read, whatever it brought).
            let hurried_read = hurried && self.drain_reads > 0;
            if !(head.status.is_decided() || client.eof_read || head_timeout_passed || hurried_read)
            {
                return Err(self.fail(format!(
                    "replies before the head was complete ({} bytes, {:?}), before end of \
                     stream and before the head timeout",
                    client.taken, head.status
                )));
            }
            if drain.head.is_head_method() != head.is_head {
                return Err(self.fail(format!(
                    "the head reader says HEAD={}, the reference {}",
                    drain.head.is_head_method(),
                    head.is_head
                )));
            }
            let refusal = drain.refusal.clone();
            self.expected_reply = Some(refusal.reply(head.is_head));
            self.check_refusal(&refusal)?;
        }
        // Time bounds.
        let s = self.settings;
        let since = match self.phase_since {
            Some((seen, since)) if seen == phase => since,
            _ => {
                self.phase_since = Some((phase, self.now));
                self.now
            }
        };
        let total = match self.options.refusal_bound {
            // A hurried refusal: one linger timeout for its read, one for the reply, no linger.
            _ if hurried => 2 * s.linger_timeout,
            RefusalBound::HeadPlusLinger => s.head_timeout + s.linger_timeout,
            RefusalBound::HeadPlusTwoLingers => s.head_timeout + 2 * s.linger_timeout,
        };
        let phase_limit = if phase == DrainPhase::ReadingHead {
            head_timeout
        } else {
            s.linger_timeout
        };
        if hurried && phase == DrainPhase::Lingering {
            return Err(self.fail("a hurried refusal lingers"));
        }
        if hurried && phase == DrainPhase::ReadingHead && self.drain_reads > 0 {
            return Err(self.fail("a hurried refusal waits for the head after its first read"));
        }
        if self.now > refused_at + total {
            return Err(self.fail(format!(
                "a refusal still open {} ms after it began (bound {} ms)",
                self.now.duration_since(refused_at).as_millis(),
                total.as_millis()
            )));
        }
        if let Some(deadline) = self.machine.deadline()
            && deadline > since + phase_limit
        {
            return Err(self.fail(format!("{phase:?} has a deadline past its own timeout")));
        }
        if self.machine.deadline().is_none() {
            return Err(self.fail("a refusal without a deadline"));
        }
        Ok(())
    }

    /// Fairness while piping: a direction that has work (by the machine's own readiness bits)
    /// waits at most [`FAIRNESS`] operations of the other direction, so a busy stream cannot
    /// starve the other way (stdin behind a chatty stdout).
    fn check_fair(&mut self, op: Op) -> Result<(), String> {
        let State::Piping {
            to_upstream,
            to_client,
            ..
        } = self.machine.state()
        else {
            self.starved = [0, 0];
            return Ok(());
        };
        let ready = |side| self.machine.readiness(side);
        let has_work = |half: &Half, source: Side| {
            (half.has_pending() && ready(source.other()).writable)
                || half.must_shutdown()
                || (half.can_read() && ready(source).readable)
        };
        let work = [
            has_work(to_upstream, Side::Client),
            has_work(to_client, Side::Upstream),
        ];
        // The direction an operation serves, by the index of its source.
        let served = match op {
            Op::Read(side) => index(side),
            Op::Write(side) | Op::ShutdownWrite(side) => index(side.other()),
            _ => return Ok(()),
        };
        for direction in 0..2 {
            if direction == served || !work[direction] {
                self.starved[direction] = 0;
            } else {
                self.starved[direction] += 1;
                if self.starved[direction] > FAIRNESS {
                    return Err(self.fail(format!(
                        "starvation: the {} direction had work for {} operations of the other",
                        ["client->upstream", "upstream->client"][direction],
                        self.starved[direction]
                    )));
                }
            }
        }
        Ok(())
    }

    /// No lost wake-up: when the machine asks for nothing and no edge is owed, nothing it could
    /// do would make progress.
    fn check_not_stuck(&self) -> Result<(), String> {
        if self.machine.next_op().is_some() {
            return Ok(());
        }
        let stuck = |what: String| Err(self.fail(format!("lost wake-up: {what}")));
        match self.machine.state() {
            State::Accepted | State::Resolving => stuck("no operation before routing".into()),
            State::Connecting { retry_at: None, .. } => stuck("no connect attempt".into()),
            State::Connecting { .. } | State::Closed(_) => Ok(()),
            State::Piping {
                to_upstream,
                to_client,
                ..
            } => {
                for (half, source) in [(to_upstream, Side::Client), (to_client, Side::Upstream)] {
                    let sink = source.other();
                    let (src, dst) = (self.peer(source), self.peer(sink));
                    if half.source == Source::Open
                        && !dst.gone_seen
                        && !half.ring.is_full()
                        && src.kernel_readable()
                        && !src.owed_read
                    {
                        return stuck(format!(
                            "{source:?} is readable and its buffer has room, but no read"
                        ));
                    }
                    if !half.ring.is_empty() && dst.kernel_writable() && !dst.owed_write {
                        return stuck(format!(
                            "{sink:?} is writable and bytes wait for it, but no write"
                        ));
                    }
                    if half.must_shutdown() {
                        return stuck(format!("end of stream for {sink:?} is not passed on"));
                    }
                }
                Ok(())
            }
            State::Draining(drain) => {
                let client = self.peer(Side::Client);
                match drain.phase {
                    DrainPhase::ReadingHead | DrainPhase::Lingering
                        if client.kernel_readable() && !client.owed_read =>
                    {
                        stuck(format!("the client is readable in {:?}", drain.phase))
                    }
                    DrainPhase::Replying if client.kernel_writable() && !client.owed_write => {
                        stuck("the client is writable but the reply waits".into())
                    }
                    DrainPhase::ShuttingDown => stuck("the shutdown waits".into()),
                    _ => Ok(()),
                }
            }
        }
    }

    /// Quiescence: both peers cooperate (send everything, close, read everything), owed edges
    /// arrive, time passes only while the machine waits for its timer. The connection must end
    /// within a bounded number of operations, with every byte delivered.
    pub fn settle(&mut self) -> Result<usize, String> {
        self.note(Event::Settle);
        let mut ops = 0;
        for round in 0..SETTLE_OPS {
            if self.machine.is_closed() {
                return Ok(round);
            }
            for side in [Side::Client, Side::Upstream] {
                self.send(side, usize::MAX);
                self.close_write(side);
                self.consume(side, usize::MAX);
            }
            self.deliver_owed();
            self.check()?;
            while self.op(0, 0, true)? {
                ops += 1;
                if ops > SETTLE_OPS {
                    return Err(self.fail("the connection never settles (a busy loop)"));
                }
            }
            if self.machine.is_closed() {
                return Ok(round);
            }
            // The peers have nothing left to do once they sent and closed, read everything,
            // and owe no edge; then only the machine's timer can move things.
            let peers_done = self.peers.iter().all(|p| {
                !p.active
                    || ((p.eof || p.broken.is_some())
                        && p.inbox == 0
                        && !p.owed_read
                        && !p.owed_write)
            });
            if peers_done && self.machine.next_op().is_none() {
                match self.machine.deadline() {
                    Some(deadline) => self.advance(deadline)?,
                    None => {
                        return Err(self.fail(
                            "hangs: both peers finished, nothing owed, no operation, no timer",
                        ));
                    }
                }
                self.check()?;
            }
        }
        Err(self.fail("the connection never settles"))
    }

    /// After the end: every input is ignored and nothing is asked for.
    fn after_end(&mut self) -> Result<(), String> {
        let inputs = [
            Input::Ready {
                side: Side::Client,
                readable: true,
                writable: true,
                hangup: false,
            },
            Input::Ready {
                side: Side::Upstream,
                readable: true,
                writable: true,
                hangup: false,
            },
            Input::Timeout,
            Input::Read {
                side: Side::Client,
                outcome: Outcome::Progress(1),
            },
            Input::Wrote {
                side: Side::Upstream,
                outcome: Outcome::Progress(1),
            },
            Input::ShutDown { side: Side::Client },
            Input::Connect(Connect::Connected),
            Input::Routed {
                upstream: "/elsewhere".into(),
            },
        ];
        for input in inputs {
            self.now += Duration::from_secs(3600);
            self.machine.handle(input, self.now);
            self.check()?;
        }
        Ok(())
    }
}
