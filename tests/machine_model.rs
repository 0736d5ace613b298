//! Property tests of the connection state machine (`conn::machine`) against a reference model,
//! through the simulation harness in `tests/sim` (shared with the `conn_machine` fuzz target).
//!
//! Each case decodes random bytes into a [`Scenario`]: settings (buffers of 1 to 64 bytes, tiny
//! head limits, short timeouts), a route plan (pipe, refuse at identify, route or connect, busy
//! backlogs up to the connect timeout) and a sequence of steps (readiness edges, spurious or owed;
//! reads and writes of random sizes; `WouldBlock` anywhere; end of stream, resets and errors on
//! either side; time passing; stale timers; aborts). After every step the harness checks:
//!
//! 1. every byte read from one side is written to the other exactly once, in order;
//! 2. a side's write is shut down only after everything before its peer's end of stream was
//!    delivered, and the other direction keeps flowing;
//! 3. nothing is read while that direction's buffer is full, and reading (or writing) resumes
//!    without a new readiness edge when the machine could go on (no lost wake-up); a direction
//!    with work waits at most two operations of the other (no starvation);
//! 4. every answered operation makes progress (the shell's busy-loop rule), a fired timer moves
//!    the deadline, and the connection ends when both directions are finished or at once on a hard
//!    error, then asks for nothing more;
//! 5. on a refusal the request head is read up to its bound (or end of stream, or the head
//!    timeout) before the reply, `HEAD` gets no body, and the connection ends within the refusal
//!    bound; a hurried refusal (`RefusedNow`) replies after its first read and never lingers;
//! 6. an idle direction holds no buffer, the admission is given up once and never needed again,
//!    and `check_invariants` holds.
//!
//! Then both peers cooperate and the connection must end, with every byte delivered.
//! `PROPTEST_CASES` raises the case counts (the defaults keep the suite to seconds).

#[path = "sim/common.rs"]
mod common;
mod sim;
use common::{cases, fuzz_seeds};

use docker_socket_router::conn::machine::{End, Settings, Side};
use docker_socket_router::head::HeadStatus;
use docker_socket_router::reply::Refusal;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestRunner};
use sim::{Options, PeerPlan, Plan, RefusalBound, Refuse, Scenario, Sim, Step};

fn config(default: u32) -> Config {
    Config {
        cases: cases(default),
        failure_persistence: None,
        ..Config::default()
    }
}

fn run(scenario: &Scenario, options: Options) -> Result<sim::Report, TestCaseError> {
    Sim::run(scenario, options)
        .map_err(|err| TestCaseError::fail(format!("{err}\nscenario: {scenario:?}")))
}

/// Scenarios forced onto the pipe path (connect succeeds after a short busy spell).
fn piped(bytes: Vec<u8>) -> Scenario {
    let mut scenario = Scenario::decode(&bytes);
    scenario.plan.refuse = Refuse::Never;
    scenario.plan.busy %= 3;
    scenario.settings.connect_timeout = std::time::Duration::from_secs(60);
    scenario
}

/// Scenarios forced onto a refusal path.
fn refused(bytes: Vec<u8>) -> Scenario {
    let mut scenario = Scenario::decode(&bytes);
    if scenario.plan.refuse == Refuse::Never {
        scenario.plan.busy = u16::MAX; // the connect timeout refuses with a 504
    }
    scenario
}

proptest! {
    #![proptest_config(config(8000))]

    /// Properties 1 to 4 and 6 on piped connections.
    #[test]
    fn prop_machine_pipe_matches_model(bytes in vec(any::<u8>(), 16..1200)) {
        run(&piped(bytes), Options::default())?;
    }

    /// Properties 4 and 5 on refused connections, with the per-phase bound.
    #[test]
    fn prop_machine_refusal_reads_head_then_replies(bytes in vec(any::<u8>(), 8..400)) {
        let options = Options::default();
        run(&refused(bytes), options)?;
    }

    /// Any scenario at all, the way the fuzz target decodes its input.
    #[test]
    fn prop_machine_any_scenario(bytes in vec(any::<u8>(), 0..800)) {
        let options = Options::default();
        run(&Scenario::decode(&bytes), options)?;
    }
}

/// Steps of a refused client that trickles: small time steps, partial reads of the reply,
/// bytes now and then, end of stream late or never. This is where refusal timing goes wrong.
fn trickling_client() -> impl Strategy<Value = Vec<Step>> {
    let client = Side::Client;
    let step = prop_oneof![
        3 => (1u16..40).prop_map(|ms| Step::Advance { ms }),
        3 => any::<u8>().prop_map(move |n| Step::Consume { side: client, n }),
        2 => Just(Step::DeliverOwed),
        3 => (any::<u8>(), any::<u8>()).prop_map(|(choice, size)| Step::Drive { choice, size }),
        1 => any::<u8>().prop_map(move |n| Step::Send { side: client, n }),
        1 => Just(Step::CloseWrite { side: client }),
        1 => Just(Step::SpuriousTimeout),
    ];
    vec(step, 0..120)
}

/// A refused scenario from `header` bytes, with the trickling client's `steps`.
fn refused_trickling(header: Vec<u8>, steps: Vec<Step>) -> Scenario {
    let mut scenario = refused(header);
    scenario.steps = steps;
    scenario
}

proptest! {
    #![proptest_config(config(2000))]

    /// Refusal timing with a trickling client (properties 4 and 5).
    #[test]
    fn prop_machine_refusal_trickling_client(
        header in vec(any::<u8>(), 8..200),
        steps in trickling_client(),
    ) {
        let options = Options::default();
        run(&refused_trickling(header, steps), options)?;
    }

    /// The stricter wording: a refused connection ends within `head_timeout +
    /// linger_timeout` of the refusal, however the client behaves. The machine (and the README)
    /// allow `linger_timeout` more: see `test_refusal_slow_reader_outlives_head_plus_linger`.
    #[test]
    fn prop_machine_refusal_ends_within_head_plus_linger(
        header in vec(any::<u8>(), 8..200),
        steps in trickling_client(),
    ) {
        let options = Options { refusal_bound: RefusalBound::HeadPlusLinger };
        run(&refused_trickling(header, steps), options)?;
    }

    /// The refusal path's head reader against a whole-input reference, in any chunking.
    #[test]
    fn prop_head_reader_matches_reference(
        input in prop_oneof![
            vec(any::<u8>(), 0..64),
            vec(prop::sample::select(b"GETHAD /\r\n:x".to_vec()), 0..64),
        ],
        limit in prop_oneof![0usize..48, Just(16 * 1024)],
        cuts in vec(any::<u8>(), 0..8),
    ) {
        sim::head_ref::check(&input, limit, &cuts).map_err(TestCaseError::fail)?;
    }
}

/// The generator reaches every way a connection ends, so the properties are not vacuous.
#[test]
fn test_scenarios_reach_every_end() {
    let mut runner = TestRunner::new(Config {
        cases: 600,
        failure_persistence: None,
        ..Config::default()
    });
    let mut seen = std::collections::BTreeMap::<&'static str, u32>::new();
    let mut delivered = 0u64;
    for _ in 0..600 {
        let bytes = vec(any::<u8>(), 0..800)
            .new_tree(&mut runner)
            .expect("a value tree")
            .current();
        let options = Options::default();
        let report = Sim::run(&Scenario::decode(&bytes), options).expect("a passing scenario");
        *seen.entry(report.end.label()).or_default() += 1;
        delivered += report.bytes.0 + report.bytes.1;
    }
    eprintln!("ends: {seen:?}, bytes piped: {delivered}");
    for end in ["completed", "refused", "reset", "error", "aborted"] {
        assert!(
            seen.get(end).copied().unwrap_or(0) > 0,
            "no scenario ended {end}: {seen:?}"
        );
    }
    assert!(delivered > 10_000, "too few bytes piped: {delivered}");
}

fn settings(buffer_size: usize) -> Settings {
    Settings {
        buffer_size,
        connect_timeout: std::time::Duration::from_millis(100),
        head_timeout: std::time::Duration::from_millis(50),
        linger_timeout: std::time::Duration::from_millis(20),
        head_limit: 16 * 1024,
    }
}

fn scenario(plan: Plan, client: &[u8], upstream: &[u8], buffer: usize, steps: &[Step]) -> Scenario {
    Scenario {
        settings: settings(buffer),
        plan,
        client: PeerPlan {
            data: client.to_vec(),
            window: 64,
        },
        upstream: PeerPlan {
            data: upstream.to_vec(),
            window: 64,
        },
        steps: steps.to_vec(),
    }
}

fn pipe_plan() -> Plan {
    Plan {
        refuse: Refuse::Never,
        refusal: Refusal::Internal("unused".into()),
        busy: 0,
        hurried: false,
    }
}

/// A drive without spurious `WouldBlock`s.
const DRIVE: Step = Step::Drive {
    choice: 0,
    size: 255,
};

/// Reads into a full ring stop, and resume when the ring drains, with no new edge: the client
/// sends 20 bytes once (one edge), the ring holds 3.
#[test]
fn test_piping_full_ring_resumes_reading_without_an_edge() {
    let steps = [
        Step::Send {
            side: Side::Client,
            n: 20,
        },
        Step::DeliverOwed,
        DRIVE,
        DRIVE,
        DRIVE,
    ];
    let mut sim = Sim::new(
        &scenario(pipe_plan(), &[7; 20], b"", 3, &steps),
        Options::default(),
    );
    for step in steps {
        sim.step(step).unwrap();
    }
    assert_eq!(sim.machine().bytes(), (20, 0), "all 20 bytes delivered");
}

/// Client end of stream reaches the daemon while the daemon's answer keeps flowing back.
#[test]
fn test_piping_client_eof_shuts_upstream_and_output_keeps_flowing() {
    let steps = [
        Step::Send {
            side: Side::Client,
            n: 5,
        },
        Step::CloseWrite { side: Side::Client },
        DRIVE,
        Step::Send {
            side: Side::Upstream,
            n: 9,
        },
        Step::DeliverOwed,
        DRIVE,
    ];
    let scenario = scenario(pipe_plan(), b"stdin", b"stdout...", 4, &steps);
    let mut sim = Sim::new(&scenario, Options::default());
    for step in steps {
        sim.step(step).unwrap();
    }
    assert_eq!(sim.machine().bytes(), (5, 9));
    assert!(
        !sim.machine().is_closed(),
        "the daemon has not finished yet"
    );
    let report = Sim::run(&scenario, Options::default()).unwrap();
    assert_eq!(report.end, End::Completed);
}

/// A refused `HEAD` request gets a reply without a body, after its whole head was read.
#[test]
fn test_draining_head_request_gets_headers_only() {
    let plan = Plan {
        refuse: Refuse::AtRoute,
        refusal: Refusal::Internal("x".into()),
        busy: 0,
        hurried: false,
    };
    let scenario = scenario(plan, b"HEAD /_ping HTTP/1.1\r\n\r\n", b"", 8, &[]);
    let report = Sim::run(&scenario, Options::default()).unwrap();
    assert!(matches!(report.end, End::Refused(Refusal::Internal(_))));
    assert_eq!(
        sim::head_ref::expect(b"HEAD /_ping HTTP/1.1\r\n\r\n", 1024).status,
        HeadStatus::Complete
    );
}

/// A user far over their limit (`RefusedNow`) is answered after one read, even with half a
/// head, and the connection closes right after the reply, without lingering.
#[test]
fn test_refusal_hurried_replies_after_one_read_and_closes_without_linger() {
    let plan = Plan {
        refuse: Refuse::AtRoute,
        refusal: Refusal::LimitReached(docker_socket_router::reply::Limit::PerUser(2)),
        busy: 0,
        hurried: true,
    };
    let steps = [
        Step::Send {
            side: Side::Client,
            n: 10,
        },
        Step::DeliverOwed,
        DRIVE,
    ];
    let mut scenario = scenario(
        plan,
        b"GET /_ping HTTP/1.1\r\nHost: x\r\n\r\n",
        b"",
        8,
        &steps,
    );
    scenario.client.window = 4096; // room for the whole reply
    let mut sim = Sim::new(&scenario, Options::default());
    for step in steps {
        sim.step(step).unwrap();
    }
    assert!(
        matches!(sim.machine().end(), Some(End::Refused(r)) if r.status() == 503),
        "closed after the reply, with no linger: {:?}",
        sim.machine().state().name()
    );
}

/// A client that reads the reply slowly keeps a refused connection open for up to
/// `head_timeout + 2 × linger_timeout`: the linger deadline starts again when the reply is
/// written. The README promises that ("discards ... for at most 1 s" after the reply); the issue
/// asks for `head_timeout + linger_timeout`. This test holds the stricter reading.
///
/// Sequence (head 50 ms, linger 20 ms, 503 reply of 231 bytes, client window 64): the client sends
/// nothing; at 50 ms the head timeout starts the reply (reply deadline 70 ms) and 64 bytes go
/// out; at 69 ms the client reads the rest in three gulps, the reply completes, the machine shuts
/// down and lingers until 89 ms. At 88 ms it is still open: 88 > 50 + 20.
#[test]
fn test_refusal_slow_reader_outlives_head_plus_linger() {
    let scenario = slow_reader();
    let strict = Options {
        refusal_bound: RefusalBound::HeadPlusLinger,
    };
    let result = Sim::run(&scenario, strict);
    assert!(result.is_ok(), "{}", result.unwrap_err());
}

/// The same slow reader stays within `head_timeout + 2 × linger_timeout`.
#[test]
fn test_refusal_slow_reader_ends_within_head_plus_two_lingers() {
    let report = Sim::run(&slow_reader(), Options::default()).unwrap();
    assert!(matches!(report.end, End::Refused(Refusal::LimitReached(_))));
}

fn slow_reader() -> Scenario {
    let plan = Plan {
        refuse: Refuse::AtRoute,
        refusal: Refusal::LimitReached(docker_socket_router::reply::Limit::Global(1)),
        busy: 0,
        hurried: false,
    };
    let mut steps = vec![
        DRIVE,
        Step::Advance { ms: 50 },
        DRIVE,
        Step::Advance { ms: 19 },
    ];
    for _ in 0..6 {
        steps.extend([
            Step::Consume {
                side: Side::Client,
                n: 255,
            },
            Step::DeliverOwed,
            DRIVE,
        ]);
    }
    steps.push(Step::Advance { ms: 19 });
    scenario(plan, b"", b"", 8, &steps)
}

/// `Closed` is final: an `Abort` after the end must not rewrite how the connection ended. (The
/// daemon frees a closed connection at once, so this is not reachable through the loop today.)
#[test]
fn test_closed_abort_keeps_its_end() {
    use docker_socket_router::conn::machine::{Input, Machine};
    let now = std::time::Instant::now();
    let mut machine = Machine::new(1, settings(8));
    machine.handle(Input::Refused(Refusal::Internal("x".into())), now);
    machine.handle(Input::Abort, now);
    assert_eq!(machine.end(), Some(&End::Aborted));
    let mut done = Machine::new(2, settings(8));
    done.handle(Input::Refused(Refusal::Internal("x".into())), now);
    done.handle(
        Input::Read {
            side: Side::Client,
            outcome: docker_socket_router::io::Outcome::Reset,
        },
        now,
    );
    let end = done.end().cloned();
    assert!(matches!(end, Some(End::Refused(_))));
    done.handle(Input::Abort, now);
    assert_eq!(
        done.end().cloned(),
        end,
        "the end of a closed connection changed"
    );
}

/// The `conn_machine` fuzz seeds (and every regression seed a crash left there) pass.
#[test]
fn test_fuzz_seeds_conn_machine() {
    for (name, bytes) in fuzz_seeds("conn_machine") {
        if let Err(violation) = Sim::check_input(&bytes) {
            panic!("seed {name}: {violation}");
        }
    }
}

/// The `head_reader` fuzz seeds pass.
#[test]
fn test_fuzz_seeds_head_reader() {
    for (name, bytes) in fuzz_seeds("head_reader") {
        if let Err(violation) = sim::head_ref::check_input(&bytes) {
            panic!("seed {name}: {violation}");
        }
    }
}
