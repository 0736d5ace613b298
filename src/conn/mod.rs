//! One client connection: its sockets, and the shell that executes its state machine's
//! operations on them.
//!
//! Contract: [`Connection::drive`] asks the pure [`Machine`] for its next operation, performs it
//! on the real socket (or route check), reports the result, and repeats until the machine waits
//! for an event, the connection closes, or the step budget is spent (then the caller drives it
//! again on the next loop pass, without waiting for an edge). An operation that changes nothing
//! would be a busy loop: it is logged with the full state and the connection is closed.
//! Sockets are registered once for read and write readiness (edge-triggered); readiness is
//! remembered by the machine, so registrations never change.

pub mod half;
pub mod machine;

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::OwnedFd;
use std::time::Instant;

use mio::net::UnixStream;
use mio::{Interest, Registry};

use crate::io::{Outcome, retry_interrupted};
use crate::peercred::peer_cred;
use crate::reply::Refusal;
use crate::route::{self, Template};
use crate::token::ConnToken;
use machine::{Connect, End, Input, Machine, Op, Side};

/// Most operations one drive call performs before yielding to other connections.
pub const STEP_BUDGET: usize = 64;

/// What the connection limits say about one more connection of a user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admit {
    /// It may be piped.
    Piped,
    /// It is refused with this reply, after reading the request head.
    Refused(Refusal),
    /// The user holds far too many connections: answer at once and close.
    RefusedNow(Refusal),
}

/// Who may hold how many connections; owned by the loop, consulted on `Route`.
pub trait Admission {
    /// Counts one more connection of `uid` and decides what becomes of it. Every call is
    /// matched by one [`Admission::leave`]; a [`Admit::Piped`] answer also by one
    /// [`Admission::end_piping`].
    fn admit(&mut self, uid: u32) -> Admit;
    /// A connection admitted for piping no longer pipes (it closed or turned into a refusal).
    fn end_piping(&mut self, uid: u32);
    /// A connection counted by [`Admission::admit`] is closed.
    fn leave(&mut self, uid: u32);
}

/// What the shell needs from the loop while it drives a connection.
pub struct Env<'a> {
    pub registry: &'a Registry,
    pub template: &'a Template,
    pub admission: &'a mut dyn Admission,
}

/// The result of one drive call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driven {
    /// Waiting for an edge or a timer.
    Waiting,
    /// The budget ran out with work left: drive again soon.
    MoreWork,
    /// The machine is closed: finish and free the slot.
    Closed,
}

pub struct Connection {
    pub id: u64,
    pub slot: usize,
    pub machine: Machine,
    pub opened: Instant,
    client: UnixStream,
    upstream: Option<UnixStream>,
    /// The checked upstream socket, held between `Route` and a successful `Connect`.
    target: Option<OwnedFd>,
    /// The uid this connection counts against, from `Route` until it closes.
    counted: Option<u32>,
    /// The uid this connection was admitted to pipe for, until it no longer pipes.
    admitted: Option<u32>,
    /// The deadline a timer was last armed for.
    pub armed: Option<Instant>,
}

impl Connection {
    pub fn new(
        id: u64,
        slot: usize,
        client: UnixStream,
        machine: Machine,
        registry: &Registry,
        now: Instant,
    ) -> io::Result<Connection> {
        let mut conn = Connection {
            id,
            slot,
            machine,
            opened: now,
            client,
            upstream: None,
            target: None,
            counted: None,
            admitted: None,
            armed: None,
        };
        let token = ConnToken::new(slot, Side::Client, id).encode();
        registry.register(
            &mut conn.client,
            token,
            Interest::READABLE | Interest::WRITABLE,
        )?;
        Ok(conn)
    }

    /// Performs operations until the machine waits, closes, or the budget is spent.
    pub fn drive(&mut self, env: &mut Env<'_>, now: Instant) -> Driven {
        for _ in 0..STEP_BUDGET {
            let Some(op) = self.machine.next_op() else {
                break;
            };
            let before = self.machine.progress_marker();
            let input = self.perform(op, env);
            self.machine.handle(input, now);
            if !self.machine.is_admitted_state()
                && let Some(uid) = self.admitted.take()
            {
                env.admission.end_piping(uid);
            }
            #[cfg(debug_assertions)]
            if let Err(broken) = self.machine.check_invariants() {
                log::error!(
                    "conn={} invariant broken: {broken}: {:?}",
                    self.id,
                    self.machine
                );
            }
            if self.machine.progress_marker() == before {
                log::error!(
                    "conn={} operation {op:?} changed nothing (a busy loop); closing. state: {:?}",
                    self.id,
                    self.machine
                );
                self.machine.handle(Input::Abort, now);
            }
        }
        if self.machine.is_closed() {
            if let Some(uid) = self.admitted.take() {
                env.admission.end_piping(uid);
            }
            if let Some(uid) = self.counted.take() {
                env.admission.leave(uid);
            }
            Driven::Closed
        } else if self.machine.next_op().is_some() {
            Driven::MoreWork
        } else {
            Driven::Waiting
        }
    }

    fn perform(&mut self, op: Op, env: &mut Env<'_>) -> Input {
        match op {
            Op::Identify => match peer_cred(&self.client) {
                Ok(cred) => Input::Identified(cred),
                Err(err) => Input::Refused(Refusal::Internal(format!(
                    "cannot read the peer credentials: {err}"
                ))),
            },
            Op::Route => self.route(env),
            Op::Connect => Input::Connect(self.connect(env)),
            Op::Read(side) => {
                let Self {
                    machine,
                    client,
                    upstream,
                    ..
                } = self;
                let stream = match side {
                    Side::Client => Some(&*client),
                    Side::Upstream => upstream.as_ref(),
                };
                let buf = machine.read_buf(side);
                let requested = buf.len();
                let outcome = match stream {
                    Some(mut stream) => {
                        Outcome::of_read(retry_interrupted(|| stream.read(buf)), requested)
                    }
                    None => Outcome::Failed(io::ErrorKind::NotConnected),
                };
                Input::Read { side, outcome }
            }
            Op::Write(side) => {
                let buf = self.machine.write_buf(side);
                let offered = buf.len();
                let outcome = match self.stream(side) {
                    Some(mut stream) => {
                        Outcome::of_write(retry_interrupted(|| stream.write(buf)), offered)
                    }
                    None => Outcome::Failed(io::ErrorKind::NotConnected),
                };
                Input::Wrote { side, outcome }
            }
            Op::ShutdownWrite(side) => {
                if let Some(stream) = self.stream(side) {
                    // ENOTCONN here means the peer is gone; the next read or write says so.
                    let _ = stream.shutdown(Shutdown::Write);
                }
                Input::ShutDown { side }
            }
        }
    }

    fn stream(&self, side: Side) -> Option<&UnixStream> {
        match side {
            Side::Client => Some(&self.client),
            Side::Upstream => self.upstream.as_ref(),
        }
    }

    fn route(&mut self, env: &mut Env<'_>) -> Input {
        let Some(peer) = self.machine.peer() else {
            return Input::Refused(Refusal::Internal("route before identify".into()));
        };
        self.counted = Some(peer.uid);
        match env.admission.admit(peer.uid) {
            Admit::Piped => self.admitted = Some(peer.uid),
            Admit::Refused(refusal) => return Input::Refused(refusal),
            Admit::RefusedNow(refusal) => return Input::RefusedNow(refusal),
        }
        let path = env.template.path_for(peer.uid);
        match route::open_checked(&path, peer.uid) {
            Ok(target) => {
                self.target = Some(target);
                Input::Routed { upstream: path }
            }
            Err(refusal) => Input::Refused(refusal),
        }
    }

    fn connect(&mut self, env: &mut Env<'_>) -> Connect {
        let (Some(target), Some(peer)) = (self.target.as_ref(), self.machine.peer()) else {
            return Connect::Failed(Refusal::Internal("connect without a checked target".into()));
        };
        let outcome = match route::connect_checked(target) {
            Ok(stream) => self.watch_upstream(stream, env.registry),
            Err(err) => {
                route::connect_error(&err, peer.uid, self.machine.upstream().unwrap_or_default())
            }
        };
        // A busy daemon is retried through the same checked inode; otherwise it is done with.
        if outcome != Connect::Busy {
            self.target = None;
        }
        outcome
    }

    fn watch_upstream(&mut self, mut stream: UnixStream, registry: &Registry) -> Connect {
        let token = ConnToken::new(self.slot, Side::Upstream, self.id).encode();
        match registry.register(&mut stream, token, Interest::READABLE | Interest::WRITABLE) {
            Ok(()) => {
                self.upstream = Some(stream);
                Connect::Connected
            }
            Err(err) => Connect::Failed(Refusal::Internal(format!(
                "cannot watch the upstream socket: {err}"
            ))),
        }
    }

    /// Deregisters both sockets; dropping the connection then closes them.
    pub fn deregister(&mut self, registry: &Registry) {
        let _ = registry.deregister(&mut self.client);
        if let Some(upstream) = self.upstream.as_mut() {
            let _ = registry.deregister(upstream);
        }
    }

    /// The one log line of a finished connection.
    pub fn summary(&self, now: Instant) -> (log::Level, String) {
        let peer = self.machine.peer();
        let field = |value: Option<String>| value.unwrap_or_else(|| "-".into());
        let (up, down) = self.machine.bytes();
        let end = self.machine.end();
        let mut line = format!(
            "conn={} uid={} gid={} pid={} upstream={} outcome={} duration_ms={} \
             bytes_to_daemon={up} bytes_from_daemon={down}",
            self.id,
            field(peer.map(|p| p.uid.to_string())),
            field(peer.map(|p| p.gid.to_string())),
            field(peer.map(|p| p.pid.to_string())),
            self.machine.upstream().unwrap_or("-"),
            end.map_or("open", End::label),
            now.saturating_duration_since(self.opened).as_millis(),
        );
        let level = match end {
            Some(End::Refused(refusal)) => {
                line.push_str(&format!(
                    " status={} reason={} message=\"{}\"",
                    refusal.status(),
                    refusal.reason(),
                    refusal.message()
                ));
                if refusal.status() == 500 {
                    log::Level::Error
                } else {
                    log::Level::Warn
                }
            }
            Some(End::Failed(side, kind)) => {
                line.push_str(&format!(" side={side:?} error=\"{kind}\""));
                log::Level::Warn
            }
            Some(End::Reset(side)) => {
                line.push_str(&format!(" side={side:?}"));
                log::Level::Info
            }
            _ => log::Level::Info,
        };
        (level, line)
    }
}
