//! The event loop: one thread, one `mio::Poll`, a slab of connections.
//!
//! Contract, per loop pass:
//! 1. `poll` with a timeout of the nearest deadline (zero while work is pending).
//! 2. Events: the listener's only sets `listener_ready`; a connection's event is checked
//!    against the slot's current connection (slot and generation) and ignored if stale, then
//!    recorded as readiness and the connection is driven; signals are read.
//! 3. Connections whose step budget ran out are driven again (fairness without lost work).
//! 4. Expired timers are checked against each connection's current deadline (stale ones skip).
//! 5. New connections are accepted only now, after the batch (so no slot is reused within it),
//!    until `WouldBlock`, the slot cap, or a per-pass budget; at the cap or on `EMFILE`-like
//!    errors accepting pauses without spinning, and resumes when a slot frees or a timer passes.
//!
//! Slots: `max_connections` connections may be piped at once (and `max_connections_per_user`
//! per uid); above that, a reserve of slots answers new clients with a 503 instead of leaving
//! them in the backlog. Stopping (`SIGTERM`/`SIGINT`) closes the listener, removes the socket,
//! lets connections finish until the grace deadline, then closes the rest; a second signal ends
//! the loop at once.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::io;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll};
use slab::Slab;

use crate::cli::Config;
use crate::conn::machine::{Input, Machine, Settings};
use crate::conn::{Admission, Admit, Connection, Driven, Env};
use crate::listener::{ListenError, Listener};
use crate::metrics::Counters;
use crate::reply::{Limit, Refusal};
use crate::signals::{Request, Signals};
use crate::token::{self, ConnToken};

/// How long a refused client may take to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a refused client's remaining input is discarded after the reply.
const LINGER_TIMEOUT: Duration = Duration::from_secs(1);
/// The most request-head bytes read on a refusal before replying anyway.
const HEAD_LIMIT: usize = 16 * 1024;
/// Accepts per loop pass, so a flood of clients cannot starve open connections.
const ACCEPT_BUDGET: usize = 128;
/// How long accepting pauses after `EMFILE`, `ENFILE` or `ENOMEM`.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
/// The listen backlog asked for (the kernel caps it at `net.core.somaxconn`).
const BACKLOG: i32 = 4096;

/// Why the router could not start.
#[derive(Debug)]
pub enum StartupError {
    Listen(ListenError),
    Io { what: &'static str, err: io::Error },
    Config(String),
}

impl fmt::Display for StartupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartupError::Listen(err) => err.fmt(f),
            StartupError::Io { what, err } => write!(f, "{what}: {err}"),
            StartupError::Config(message) => f.write_str(message),
        }
    }
}

fn startup(what: &'static str) -> impl FnOnce(io::Error) -> StartupError {
    move |err| StartupError::Io { what, err }
}

/// Connection limits, global and per uid.
///
/// A uid may pipe `per_user` connections; `piping` counts them, and all uids together may
/// pipe `max`. Refused connections hold a slot while they read the head and linger, so each uid
/// may also hold only `per_user_slots` connections in any state (`held`); past that its new
/// connections are answered at once and closed, and one user cannot fill the slots that every
/// user shares.
struct Limits {
    max: usize,
    per_user: usize,
    per_user_slots: usize,
    piping_total: usize,
    piping: HashMap<u32, usize>,
    held: HashMap<u32, usize>,
}

impl Limits {
    fn new(max: usize, per_user: usize) -> Limits {
        Limits {
            max,
            per_user,
            per_user_slots: per_user + (per_user / 4).clamp(4, 64),
            piping_total: 0,
            piping: HashMap::new(),
            held: HashMap::new(),
        }
    }
}

/// Takes one from a per-uid count, forgetting uids that reach zero.
fn decrement(counts: &mut HashMap<u32, usize>, uid: u32) {
    if let Some(count) = counts.get_mut(&uid) {
        *count = count.saturating_sub(1);
        if *count == 0 {
            counts.remove(&uid);
        }
    }
}

impl Admission for Limits {
    fn admit(&mut self, uid: u32) -> Admit {
        let held = self.held.entry(uid).or_insert(0);
        *held += 1;
        if *held > self.per_user_slots {
            return Admit::RefusedNow(Refusal::LimitReached(Limit::PerUser(self.per_user)));
        }
        if self.piping_total >= self.max {
            return Admit::Refused(Refusal::LimitReached(Limit::Global(self.max)));
        }
        let piping = self.piping.entry(uid).or_insert(0);
        if *piping >= self.per_user {
            return Admit::Refused(Refusal::LimitReached(Limit::PerUser(self.per_user)));
        }
        *piping += 1;
        self.piping_total += 1;
        Admit::Piped
    }

    fn end_piping(&mut self, uid: u32) {
        decrement(&mut self.piping, uid);
        self.piping_total = self.piping_total.saturating_sub(1);
    }

    fn leave(&mut self, uid: u32) {
        decrement(&mut self.held, uid);
    }
}

/// Raises the soft descriptor limit to the hard one, and warns if even that is too low for
/// `slots` connections (two sockets each, plus a few for the loop itself).
fn ensure_descriptors(slots: usize) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let needed = (2 * slots + 32) as u64;
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let mut limit = soft;
    if soft < hard && soft < needed {
        let raised = hard.min(needed.max(soft));
        if setrlimit(Resource::RLIMIT_NOFILE, raised, hard).is_ok() {
            limit = raised;
        }
    }
    if limit < needed {
        log::warn!(
            "up to {slots} connections need about {needed} file descriptors, but the limit is \
             {limit}: raise it (LimitNOFILE= in the unit, ulimit -n) or lower --max-connections; \
             until then accepting pauses when descriptors run out"
        );
    }
}

pub struct Daemon {
    config: Config,
    settings: Settings,
    poll: Poll,
    listener: Option<Listener>,
    signals: Signals,
    conns: Slab<Connection>,
    /// Slots in all: piped connections plus the reserve that answers 503s.
    slot_cap: usize,
    limits: Limits,
    timers: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    pending: Vec<usize>,
    listener_ready: bool,
    accept_paused_until: Option<Instant>,
    last_accept_error_log: Option<Instant>,
    next_id: u64,
    counters: Counters,
    grace_deadline: Option<Instant>,
}

impl Daemon {
    /// Binds the socket and sets up the loop; nothing is accepted until [`Daemon::run`].
    pub fn new(config: Config) -> Result<Daemon, StartupError> {
        if let Some(link) = config.user_socket.symlink_in_fixed_dir() {
            return Err(StartupError::Config(format!(
                "--user-socket {}: {} is a symbolic link, and symlinks in users' socket paths \
                 are never followed, so every user would be refused; use the real path",
                config.user_socket,
                link.display()
            )));
        }
        let signals = Signals::new().map_err(startup("set up signal handling"))?;
        let poll = Poll::new().map_err(startup("create the poller"))?;
        let mut listener = Listener::bind(&config.socket, config.socket_mode, BACKLOG)
            .map_err(StartupError::Listen)?;
        poll.registry()
            .register(&mut listener.socket, token::LISTENER, Interest::READABLE)
            .map_err(startup("watch the listening socket"))?;
        poll.registry()
            .register(
                &mut SourceFd(&signals.raw_fd()),
                token::SIGNALS,
                Interest::READABLE,
            )
            .map_err(startup("watch signals"))?;
        let settings = Settings {
            buffer_size: config.buffer_size,
            connect_timeout: config.connect_timeout,
            head_timeout: HEAD_TIMEOUT,
            linger_timeout: LINGER_TIMEOUT,
            head_limit: HEAD_LIMIT,
        };
        let reserve = (config.max_connections / 8).clamp(16, 1024);
        let slot_cap = (config.max_connections + reserve).min(token::MAX_SLOT);
        ensure_descriptors(slot_cap);
        Ok(Daemon {
            slot_cap,
            limits: Limits::new(config.max_connections, config.max_connections_per_user),
            settings,
            poll,
            listener: Some(listener),
            signals,
            conns: Slab::new(),
            timers: BinaryHeap::new(),
            pending: Vec::new(),
            listener_ready: true,
            accept_paused_until: None,
            last_accept_error_log: None,
            next_id: 1,
            counters: Counters::default(),
            grace_deadline: None,
            config,
        })
    }

    /// Runs until stopped by a signal. Returns after every connection is closed.
    pub fn run(mut self) -> Result<(), StartupError> {
        log::info!(
            "listening on {} (mode {:04o}) routing to {} max_connections={} \
             max_connections_per_user={} buffer_size={}",
            self.config.socket.display(),
            self.config.socket_mode,
            self.config.user_socket,
            self.config.max_connections,
            self.config.max_connections_per_user,
            self.config.buffer_size
        );
        match crate::notify::notify("READY=1") {
            Ok(_) => {}
            Err(err) => log::warn!("cannot tell systemd we are ready: {err}"),
        }
        let mut events = Events::with_capacity(256);
        loop {
            let timeout = self.poll_timeout(Instant::now());
            if let Err(err) = self.poll.poll(&mut events, timeout) {
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(StartupError::Io { what: "poll", err });
            }
            let now = Instant::now();
            for event in events.iter() {
                match event.token() {
                    token::LISTENER => self.listener_ready = true,
                    token::SIGNALS => {
                        if self.on_signals(now) {
                            log::info!("second stop signal: exiting now");
                            return Ok(());
                        }
                    }
                    token => self.on_conn_event(token, event, now),
                }
            }
            self.drive_pending(now);
            self.fire_timers(now);
            self.accept(now);
            if self.grace_deadline.is_some_and(|deadline| now >= deadline) {
                self.abort_all(now);
            }
            if self.grace_deadline.is_some() && self.conns.is_empty() {
                log::info!("stopped; {}", self.counters.summary(std::iter::empty()));
                return Ok(());
            }
        }
    }

    fn poll_timeout(&self, now: Instant) -> Option<Duration> {
        if !self.pending.is_empty() || (self.can_accept(now) && self.listener_ready) {
            return Some(Duration::ZERO);
        }
        let deadlines = [
            self.timers.peek().map(|Reverse((at, _, _))| *at),
            self.accept_paused_until,
            self.grace_deadline,
        ];
        deadlines
            .into_iter()
            .flatten()
            .min()
            .map(|at| at.saturating_duration_since(now))
    }

    fn can_accept(&self, now: Instant) -> bool {
        self.listener.is_some()
            && self.conns.len() < self.slot_cap
            && self.accept_paused_until.is_none_or(|until| now >= until)
    }

    /// Returns true when the loop must end at once (a second stop signal).
    fn on_signals(&mut self, now: Instant) -> bool {
        for request in self.signals.drain() {
            match request {
                Request::Counters => {
                    let live = self.conns.iter().map(|(_, conn)| conn.machine.bytes());
                    log::info!("{}", self.counters.summary(live));
                }
                Request::Ignored(name) => log::info!("{name} ignored"),
                Request::Stop if self.grace_deadline.is_some() => return true,
                Request::Stop => self.begin_stop(now),
            }
        }
        false
    }

    fn begin_stop(&mut self, now: Instant) {
        if let Some(mut listener) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut listener.socket);
            if listener.remove_socket_file() {
                log::info!("removed {}", listener.path().display());
            }
        }
        self.listener_ready = false;
        self.grace_deadline = Some(now + self.config.shutdown_timeout);
        if let Err(err) = crate::notify::notify("STOPPING=1") {
            log::warn!("cannot tell systemd we are stopping: {err}");
        }
        log::info!(
            "stopping: open connections: {}, grace period {} ms",
            self.conns.len(),
            self.config.shutdown_timeout.as_millis()
        );
    }

    fn abort_all(&mut self, now: Instant) {
        let slots: Vec<usize> = self.conns.iter().map(|(slot, _)| slot).collect();
        for slot in slots {
            if let Some(conn) = self.conns.get_mut(slot) {
                conn.machine.handle(Input::Abort, now);
            }
            self.drive(slot, now);
        }
    }

    fn on_conn_event(&mut self, token: mio::Token, event: &mio::event::Event, now: Instant) {
        let Some(decoded) = ConnToken::decode(token) else {
            return;
        };
        let Some(conn) = self.conns.get_mut(decoded.slot) else {
            return; // the slot was freed earlier in this batch
        };
        if !decoded.matches(conn.id) {
            return; // an event for a connection that no longer exists
        }
        // Closed and error flags are hints: the next read or write tells the truth.
        let readable = event.is_readable() || event.is_read_closed() || event.is_error();
        let writable = event.is_writable() || event.is_write_closed() || event.is_error();
        // Both directions of our socket are shut: the peer closed (or we shut our side and it
        // half-closed, which the machine tells apart).
        let hangup = event.is_write_closed() || event.is_error();
        conn.machine.handle(
            Input::Ready {
                side: decoded.side,
                readable,
                writable,
                hangup,
            },
            now,
        );
        self.drive(decoded.slot, now);
    }

    fn drive(&mut self, slot: usize, now: Instant) {
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        let mut env = Env {
            registry: self.poll.registry(),
            template: &self.config.user_socket,
            admission: &mut self.limits,
        };
        let driven = conn.drive(&mut env, now);
        self.after_drive(slot, driven, now);
    }

    fn after_drive(&mut self, slot: usize, driven: Driven, now: Instant) {
        match driven {
            Driven::Closed => self.finish(slot, now),
            Driven::MoreWork => {
                if !self.pending.contains(&slot) {
                    self.pending.push(slot);
                }
                self.arm_timer(slot);
            }
            Driven::Waiting => self.arm_timer(slot),
        }
    }

    fn arm_timer(&mut self, slot: usize) {
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        let deadline = conn.machine.deadline();
        if deadline != conn.armed {
            conn.armed = deadline;
            if let Some(at) = deadline {
                self.timers.push(Reverse((at, slot, conn.id)));
            }
        }
    }

    fn drive_pending(&mut self, now: Instant) {
        for slot in std::mem::take(&mut self.pending) {
            self.drive(slot, now);
        }
    }

    fn fire_timers(&mut self, now: Instant) {
        while let Some(Reverse((at, slot, id))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            let Some(conn) = self.conns.get_mut(slot) else {
                continue;
            };
            // A stale entry: another connection in the slot, or the deadline moved since.
            if conn.id != id || conn.armed != Some(at) {
                continue;
            }
            conn.armed = None;
            conn.machine.handle(Input::Timeout, now);
            self.drive(slot, now);
        }
    }

    fn finish(&mut self, slot: usize, now: Instant) {
        if !self.conns.contains(slot) {
            return;
        }
        let mut conn = self.conns.remove(slot);
        conn.deregister(self.poll.registry());
        self.pending.retain(|&pending| pending != slot);
        let (level, line) = conn.summary(now);
        log::log!(level, "{line}");
        if let Some(end) = conn.machine.end() {
            let (up, down) = conn.machine.bytes();
            self.counters.closed(end, up, down);
        }
    }

    fn accept(&mut self, now: Instant) {
        if self.accept_paused_until.is_some_and(|until| now >= until) {
            self.accept_paused_until = None;
        }
        let mut accepted = 0;
        while self.listener_ready && self.can_accept(now) && accepted < ACCEPT_BUDGET {
            let Some(listener) = self.listener.as_ref() else {
                return;
            };
            match listener.socket.accept() {
                Ok((stream, _)) => {
                    accepted += 1;
                    self.open(stream, now);
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    self.listener_ready = false;
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) if err.kind() == io::ErrorKind::ConnectionAborted => {}
                Err(err) => {
                    // EMFILE, ENFILE, ENOBUFS, ENOMEM: the client stays queued; pause, do not spin.
                    self.counters.accept_errors += 1;
                    self.accept_paused_until = Some(now + ACCEPT_PAUSE);
                    let quiet = self.last_accept_error_log.is_some_and(|at| {
                        now.saturating_duration_since(at) < Duration::from_secs(10)
                    });
                    if !quiet {
                        self.last_accept_error_log = Some(now);
                        log::error!(
                            "accept failed: {err}; pausing accepts for {} ms (open connections: {})",
                            ACCEPT_PAUSE.as_millis(),
                            self.conns.len()
                        );
                    }
                    return;
                }
            }
        }
    }

    fn open(&mut self, stream: mio::net::UnixStream, now: Instant) {
        let id = self.next_id;
        self.next_id += 1;
        let entry = self.conns.vacant_entry();
        let slot = entry.key();
        let machine = Machine::new(id, self.settings);
        match Connection::new(id, slot, stream, machine, self.poll.registry(), now) {
            Ok(conn) => {
                entry.insert(conn);
                self.counters.opened();
                self.drive(slot, now);
            }
            Err(err) => log::error!("conn={id} cannot watch the client socket: {err}; closed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_limits_per_user_then_global_then_hurried() {
        let mut limits = Limits::new(3, 2);
        assert_eq!(limits.per_user_slots, 6);
        assert_eq!(limits.admit(1), Admit::Piped);
        assert_eq!(limits.admit(1), Admit::Piped);
        let per_user = Admit::Refused(Refusal::LimitReached(Limit::PerUser(2)));
        assert_eq!(limits.admit(1), per_user);
        assert_eq!(limits.admit(2), Admit::Piped);
        let global = Admit::Refused(Refusal::LimitReached(Limit::Global(3)));
        assert_eq!(limits.admit(2), global);
        // uid 1 holds 3 connections; three more fill its slots, the next is hurried.
        for _ in 0..3 {
            assert!(matches!(limits.admit(1), Admit::Refused(_)));
        }
        assert!(matches!(limits.admit(1), Admit::RefusedNow(_)));
        // Ending one pipe frees room for the other user.
        limits.end_piping(2);
        limits.leave(2);
        limits.leave(2);
        assert_eq!(limits.admit(2), Admit::Piped);
        for _ in 0..7 {
            limits.leave(1);
        }
        assert!(!limits.held.contains_key(&1), "counts return to zero");
    }
}
