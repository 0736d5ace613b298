//! Side-by-side benchmark: a direct connection vs. the router vs. `socat`, in one run.
//!
//! Run it with
//!
//! ```sh
//! cargo test --release --test bench -- --ignored --nocapture
//! ```
//!
//! (`#[ignore]` keeps it out of the normal suite; `--release` builds the router binary it starts
//! in release too.) Machines here are shared and noisy, so nothing is a pass/fail threshold:
//! every path runs every measurement once per round, in rotating order, and the report gives
//! the median over the rounds, the spread and the ratio to the direct connection.
//!
//! Set-up, all under a fresh temporary directory:
//! - an in-process upstream server on `<uid>.sock`, a thread per connection. The first byte a
//!   client sends picks the mode: `D` discards the stream, checks it and, at end of stream
//!   (half-close), answers with the byte count and a verdict; anything else echoes every byte
//!   back and passes end of stream on;
//! - the real router (`CARGO_BIN_EXE_docker-socket-router`) on `router.sock`, routing the
//!   current uid to `%d.sock` (a socket we bound ourselves, so it is owned by our uid);
//! - `socat -t 5 UNIX-LISTEN:socat.sock,fork,reuseaddr UNIX-CONNECT:<uid>.sock` (a `fork` per
//!   connection; `-t 5` only lets a half-closed stream finish on a loaded machine). If `socat`
//!   is not installed, its column is skipped.
//!
//! Measured per path: bulk throughput one way (256 MiB, then half-close and the server's
//! count) and both ways at once (64 MiB echoed), 64-byte request/response latency (20 000
//! round trips on one connection: median and p99), connection rate (2 000 × connect, 64 bytes
//! there and back, close), and for the router and socat their CPU time and memory: RSS (and
//! PSS) idle, with 200 idle connections, and the peak during the bulk transfers; for socat the
//! sum over its listener and every forked child. The run stops adding rounds once a time
//! budget is spent (at least 3 rounds), and a watchdog kills everything it started if the run
//! ever hangs. `DSR_BENCH_ROUNDS` and `DSR_BENCH_BUDGET_SECS` override the round count and
//! the budget; `DSR_BENCH_BUFFER_SIZE` (e.g. `256K`) is passed to the router as `--buffer-size`.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

/// Bytes streamed one way to the discarding upstream.
const BULK_ONE_WAY: usize = 256 << 20;
/// Bytes sent, and echoed back, in the two-way bulk test.
const BULK_ECHO: usize = 64 << 20;
/// Round trips in the latency test.
const RTT_COUNT: usize = 20_000;
/// Size of one latency / connection-rate message.
const MSG: usize = 64;
/// Connections in the connection-rate test.
const CONNS: usize = 2_000;
/// Connections held open for the idle-memory figure.
const IDLE_CONNS: usize = 200;
/// Read and write size of the benchmark clients and the upstream server.
const CHUNK: usize = 64 << 10;
/// The test pattern repeats every `PERIOD` bytes (a prime, so it never lines up with chunks).
const PERIOD: usize = 251;
/// Any single read or write that blocks longer than this fails the run.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a started process may take to serve its socket.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How often RSS is sampled during the bulk transfers.
const SAMPLE_EVERY: Duration = Duration::from_millis(5);
const DEFAULT_ROUNDS: usize = 7;
const MIN_ROUNDS: usize = 3;
/// No new round starts once it would likely end after this.
const DEFAULT_BUDGET: Duration = Duration::from_secs(150);
/// The whole run is killed after this, whatever it is doing.
const WATCHDOG: Duration = Duration::from_secs(600);

/// Mode bytes: the first byte of a connection's stream.
const DISCARD: u8 = b'D';
const ECHO: u8 = b'E';

// ---------------------------------------------------------------------------------------------
// The test pattern: byte `i` of a stream that starts with mode byte `m` is `(i + m) % PERIOD`,
// so every stream starts with its mode byte and can be checked with one `memcmp` per chunk.

fn table() -> &'static [u8] {
    static TABLE: OnceLock<Vec<u8>> = OnceLock::new();
    TABLE.get_or_init(|| (0..CHUNK + PERIOD).map(|i| (i % PERIOD) as u8).collect())
}

/// The `len` (at most `CHUNK`) bytes at `offset` of the stream that starts with `mode`.
fn expected(offset: usize, mode: u8, len: usize) -> &'static [u8] {
    let start = (offset + usize::from(mode)) % PERIOD;
    &table()[start..start + len]
}

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

// ---------------------------------------------------------------------------------------------
// The upstream server.

fn start_upstream(path: &Path) -> io::Result<()> {
    let listener = UnixListener::bind(path)?;
    thread::Builder::new()
        .name("upstream-accept".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                // A connection whose thread cannot start is dropped; its client fails loudly.
                let _ = thread::Builder::new()
                    .name("upstream-conn".into())
                    .stack_size(256 << 10)
                    .spawn(move || serve(stream));
            }
        })?;
    Ok(())
}

fn serve(mut stream: UnixStream) -> io::Result<()> {
    // Generous: the idle connections sit here while the memory is read.
    stream.set_read_timeout(Some(IO_TIMEOUT * 4))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut buf = vec![0u8; CHUNK];
    let mut n = stream.read(&mut buf)?;
    if n == 0 {
        return Ok(());
    }
    if buf[0] == DISCARD {
        let mut count = 0usize;
        let mut intact = true;
        while n > 0 {
            intact &= buf[..n] == *expected(count, DISCARD, n);
            count += n;
            n = stream.read(&mut buf)?;
        }
        let mut reply = [0u8; 9];
        reply[..8].copy_from_slice(&(count as u64).to_le_bytes());
        reply[8] = u8::from(intact);
        stream.write_all(&reply)?;
    } else {
        while n > 0 {
            stream.write_all(&buf[..n])?;
            n = stream.read(&mut buf)?;
        }
        stream.shutdown(Shutdown::Write)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Child processes: each in its own process group, killed with its group on every exit path.

/// Process groups we started, for the watchdog.
static GROUPS: Mutex<Vec<i32>> = Mutex::new(Vec::new());

struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
    reaped: bool,
}

impl Proc {
    fn spawn(name: &'static str, command: &mut Command, log: PathBuf) -> io::Result<Proc> {
        let stderr = fs::File::create(&log)?;
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .process_group(0)
            .spawn()?;
        GROUPS.lock().unwrap().push(child.id() as i32);
        Ok(Proc {
            name,
            child,
            log,
            reaped: false,
        })
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn check_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            self.reaped = true;
            panic!(
                "{} exited early ({status}); its log:\n{}",
                self.name,
                self.log_tail()
            );
        }
    }

    fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// SIGTERM, then the exit status within `grace` (SIGKILL of the group after that).
    fn stop(&mut self, grace: Duration) -> String {
        let _ = kill(Pid::from_raw(self.pid()), Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.reaped = true;
                // Forked children (socat) die with their group.
                let _ = killpg(Pid::from_raw(self.pid()), Signal::SIGKILL);
                return status.to_string();
            }
            thread::sleep(Duration::from_millis(10));
        }
        format!("did not exit within {} ms of SIGTERM", grace.as_millis())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if !self.reaped {
            // The leader is not reaped yet, so its pid still names our group.
            let _ = killpg(Pid::from_raw(self.pid()), Signal::SIGKILL);
            let _ = self.child.wait();
        }
        GROUPS.lock().unwrap().retain(|&pgid| pgid != self.pid());
        if thread::panicking() {
            eprintln!(
                "--- last lines of the {} log:\n{}",
                self.name,
                self.log_tail()
            );
        }
    }
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Kills every started process group and ends the run if it is still going after `limit`.
fn start_watchdog(limit: Duration, done: Arc<AtomicBool>) {
    thread::spawn(move || {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if done.load(Ordering::Relaxed) {
                return;
            }
            thread::sleep(Duration::from_millis(200));
        }
        eprintln!(
            "bench: watchdog: still running after {} s; killing what it started",
            limit.as_secs()
        );
        for &pgid in GROUPS.lock().unwrap().iter() {
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        }
        std::process::exit(2);
    });
}

// ---------------------------------------------------------------------------------------------
// /proc readings.

fn status_kib(pid: i32, field: &str) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    kib_field(&text, field)
}

fn kib_field(text: &str, field: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

fn pss_kib(pid: i32) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    kib_field(&text, "Pss")
}

/// The fields of `/proc/<pid>/stat` after the command name: index 0 is field 3 (state).
fn stat_fields(pid: i32) -> Option<Vec<u64>> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    Some(
        rest.split_whitespace()
            .map(|field| field.parse().unwrap_or(0))
            .collect(),
    )
}

fn children_of(parent: i32) -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| stat_fields(pid).and_then(|f| f.get(1).copied()) == Some(parent as u64))
        .collect()
}

/// User + system CPU time in ms of `pid` and of its children it has already reaped.
fn cpu_ms(pid: i32) -> f64 {
    let ticks_per_s = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let ticks: u64 = stat_fields(pid).map_or(0, |f| f.get(11..15).unwrap_or(&[]).iter().sum());
    ticks as f64 * 1000.0 / ticks_per_s
}

/// Memory of a proxy: its process and (for socat) every child it forked.
#[derive(Debug, Clone, Copy, Default)]
struct Mem {
    processes: usize,
    rss_kib: u64,
    pss_kib: u64,
}

fn mem_of_tree(pid: i32) -> Mem {
    let mut mem = Mem::default();
    for pid in std::iter::once(pid).chain(children_of(pid)) {
        if let Some(rss) = status_kib(pid, "VmRSS") {
            mem.processes += 1;
            mem.rss_kib += rss;
            mem.pss_kib += pss_kib(pid).unwrap_or(0);
        }
    }
    mem
}

/// Samples the summed RSS of a proxy (and its children) until stopped; yields the peak.
struct Sampler {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<u64>,
}

impl Sampler {
    /// Samples `pid`, and with `forks` also the children it forks.
    fn start(pid: i32, forks: bool) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = thread::spawn(move || {
            let mut peak = 0;
            // The child serving the transfer is looked up until found, then only it is read.
            let mut children = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                if forks && children.is_empty() {
                    children = children_of(pid);
                }
                let total: u64 = std::iter::once(pid)
                    .chain(children.iter().copied())
                    .filter_map(|pid| status_kib(pid, "VmRSS"))
                    .sum();
                peak = peak.max(total);
                thread::sleep(SAMPLE_EVERY);
            }
            peak
        });
        Sampler { stop, handle }
    }

    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or(0)
    }
}

// ---------------------------------------------------------------------------------------------
// The three paths.

struct Target {
    name: &'static str,
    socket: PathBuf,
    /// The proxy process, if the path has one.
    proxy: Option<Proc>,
    /// The proxy forks a child per connection (socat).
    forks: bool,
}

impl Target {
    fn proxy_pid(&self) -> Option<i32> {
        self.proxy.as_ref().map(Proc::pid)
    }

    /// Waits until the proxy has no forked children left (socat), so measurements don't overlap.
    fn settle(&self) {
        let Some(pid) = self.proxy_pid() else {
            return;
        };
        let deadline = Instant::now() + IO_TIMEOUT;
        while self.forks && !children_of(pid).is_empty() {
            assert!(
                Instant::now() < deadline,
                "{}: forked children still alive after {} s",
                self.name,
                IO_TIMEOUT.as_secs()
            );
            thread::sleep(Duration::from_millis(5));
        }
        // The router closes its side asynchronously; give it a moment too.
        thread::sleep(Duration::from_millis(20));
    }
}

fn connect(path: &Path) -> io::Result<UnixStream> {
    let stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(stream)
}

/// One 64-byte echo on a stream; the first message of a connection selects echo mode.
fn echo_once(stream: &mut UnixStream) -> io::Result<()> {
    let message = expected(0, ECHO, MSG);
    let mut back = [0u8; MSG];
    stream.write_all(message)?;
    stream.read_exact(&mut back)?;
    if back != *message {
        return Err(invalid("echo came back altered".into()));
    }
    Ok(())
}

/// Waits for the socket to appear, reads the proxy's memory before any connection, then waits
/// until a 64-byte echo goes through. Returns that first memory reading.
fn wait_until_serving(target: &mut Target) -> Option<Mem> {
    let deadline = Instant::now() + START_TIMEOUT;
    let check = |target: &mut Target, what: &str| {
        if let Some(proxy) = target.proxy.as_mut() {
            proxy.check_running();
        }
        assert!(
            Instant::now() < deadline,
            "{} does not serve {} after {} s: {what}",
            target.name,
            target.socket.display(),
            START_TIMEOUT.as_secs()
        );
    };
    while !target.socket.exists() {
        check(target, "no socket file");
        thread::sleep(Duration::from_millis(10));
    }
    thread::sleep(Duration::from_millis(50));
    let fresh = target.proxy_pid().map(mem_of_tree);
    while let Err(err) = connect(&target.socket).and_then(|mut s| echo_once(&mut s)) {
        check(target, &err.to_string());
        thread::sleep(Duration::from_millis(20));
    }
    target.settle();
    fresh
}

// ---------------------------------------------------------------------------------------------
// Measurements.

fn mib_per_s(bytes: usize, elapsed: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / elapsed.as_secs_f64()
}

/// Streams `total` bytes to the discarding upstream, half-closes, reads its count; MiB/s.
fn bulk_one_way(path: &Path, total: usize) -> io::Result<f64> {
    let mut stream = connect(path)?;
    let started = Instant::now();
    let mut sent = 0;
    while sent < total {
        let n = CHUNK.min(total - sent);
        stream.write_all(expected(sent, DISCARD, n))?;
        sent += n;
    }
    stream.shutdown(Shutdown::Write)?;
    let mut reply = [0u8; 9];
    stream.read_exact(&mut reply)?;
    let elapsed = started.elapsed();
    let count = u64::from_le_bytes(reply[..8].try_into().unwrap());
    if count != total as u64 || reply[8] != 1 {
        return Err(invalid(format!(
            "upstream got {count} of {total} bytes, intact: {}",
            reply[8] == 1
        )));
    }
    if stream.read(&mut reply)? != 0 {
        return Err(invalid("bytes after the upstream's count".into()));
    }
    Ok(mib_per_s(total, elapsed))
}

/// Sends `total` bytes from a writer thread while reading the echo; MiB/s each way.
fn bulk_echo(path: &Path, total: usize) -> io::Result<f64> {
    let mut stream = connect(path)?;
    let mut writer = stream.try_clone()?;
    let started = Instant::now();
    let sending = thread::spawn(move || -> io::Result<()> {
        let mut sent = 0;
        while sent < total {
            let n = CHUNK.min(total - sent);
            writer.write_all(expected(sent, ECHO, n))?;
            sent += n;
        }
        writer.shutdown(Shutdown::Write)
    });
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0;
    while got < total {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Err(invalid(format!(
                "end of stream after {got} of {total} bytes"
            )));
        }
        let n = n.min(total - got);
        if buf[..n] != *expected(got, ECHO, n) {
            return Err(invalid(format!("echo altered near byte {got}")));
        }
        got += n;
    }
    // The upstream passes our half-close back once everything is echoed.
    if stream.read(&mut buf)? != 0 {
        return Err(invalid("more bytes than were sent".into()));
    }
    let elapsed = started.elapsed();
    sending
        .join()
        .map_err(|_| invalid("writer thread panicked".into()))??;
    Ok(mib_per_s(total, elapsed))
}

/// `count` round trips of 64 bytes on one connection: (median µs, p99 µs).
fn round_trips(path: &Path, count: usize) -> io::Result<(f64, f64)> {
    let mut stream = connect(path)?;
    for _ in 0..100 {
        echo_once(&mut stream)?; // warm the path up
    }
    let message = expected(0, ECHO, MSG);
    let mut back = [0u8; MSG];
    let mut samples = Vec::with_capacity(count);
    for _ in 0..count {
        let started = Instant::now();
        stream.write_all(message)?;
        stream.read_exact(&mut back)?;
        samples.push(started.elapsed().as_nanos() as u64);
        if back != *message {
            return Err(invalid("echo came back altered".into()));
        }
    }
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize] as f64 / 1000.0;
    Ok((at(0.5), at(0.99)))
}

/// `count` × (connect, 64 bytes there and back, close); connections per second.
fn connection_rate(path: &Path, count: usize) -> io::Result<f64> {
    let started = Instant::now();
    for _ in 0..count {
        let mut stream = connect(path)?;
        echo_once(&mut stream)?;
    }
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

/// Opens `count` connections, each with one echo so every hop is set up, and holds them.
fn open_idle(path: &Path, count: usize) -> io::Result<Vec<UnixStream>> {
    (0..count)
        .map(|_| {
            let mut stream = connect(path)?;
            echo_once(&mut stream)?;
            Ok(stream)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Results.

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Metric {
    BulkOneWay,
    BulkEcho,
    RttMedian,
    RttP99,
    ConnRate,
    CpuOneWay,
    CpuEcho,
    CpuRtt,
    CpuConns,
    MemIdle,
    MemIdleConns,
    MemPerConn,
    PssIdleConns,
    PssPerConn,
    ProcsIdleConns,
    MemPeakOneWay,
    MemPeakEcho,
}

impl Metric {
    fn label(self) -> &'static str {
        match self {
            Metric::BulkOneWay => "bulk one way, 256 MiB + half-close",
            Metric::BulkEcho => "bulk both ways, 64 MiB echoed",
            Metric::RttMedian => "64 B round trip, median",
            Metric::RttP99 => "64 B round trip, p99",
            Metric::ConnRate => "connect + 64 B echo + close",
            Metric::CpuOneWay => "proxy CPU, bulk one way (per GiB)",
            Metric::CpuEcho => "proxy CPU, bulk both ways (per GiB each way)",
            Metric::CpuRtt => "proxy CPU per 1000 round trips of 64 B",
            Metric::CpuConns => "proxy CPU per 1000 connections",
            Metric::MemIdle => "RSS idle",
            Metric::MemIdleConns => "RSS with 200 idle connections",
            Metric::MemPerConn => "RSS per idle connection",
            Metric::PssIdleConns => "PSS with 200 idle connections",
            Metric::PssPerConn => "PSS per idle connection",
            Metric::ProcsIdleConns => "processes with 200 idle connections",
            Metric::MemPeakOneWay => "RSS peak during bulk one way",
            Metric::MemPeakEcho => "RSS peak during bulk both ways",
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Metric::BulkOneWay | Metric::BulkEcho => "MiB/s",
            Metric::RttMedian | Metric::RttP99 => "µs",
            Metric::ConnRate => "conn/s",
            Metric::CpuOneWay | Metric::CpuEcho | Metric::CpuRtt | Metric::CpuConns => "ms",
            Metric::ProcsIdleConns => "",
            _ => "KiB",
        }
    }

    fn decimals(self) -> usize {
        match self {
            Metric::ConnRate
            | Metric::ProcsIdleConns
            | Metric::MemIdle
            | Metric::MemIdleConns
            | Metric::PssIdleConns
            | Metric::MemPeakOneWay
            | Metric::MemPeakEcho
            | Metric::CpuOneWay
            | Metric::CpuEcho
            | Metric::CpuConns => 0,
            _ => 1,
        }
    }
}

/// Every per-round value, by metric and path.
#[derive(Default)]
struct Results {
    values: BTreeMap<(Metric, &'static str), Vec<f64>>,
}

impl Results {
    fn record(&mut self, metric: Metric, path: &'static str, value: f64) {
        self.values.entry((metric, path)).or_default().push(value);
    }

    fn median(&self, metric: Metric, path: &str) -> Option<f64> {
        let values = self
            .values
            .iter()
            .find(|((m, p), _)| *m == metric && *p == path)?
            .1;
        Some(median(values))
    }

    fn spread(&self, metric: Metric, path: &str) -> Option<(f64, f64)> {
        let values = self
            .values
            .iter()
            .find(|((m, p), _)| *m == metric && *p == path)?
            .1;
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        Some((min, max))
    }
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    }
}

fn fmt_value(value: f64, decimals: usize) -> String {
    format!("{value:.decimals$}")
}

fn print_report(results: &Results, paths: &[&'static str], rounds: usize) {
    println!();
    println!(
        "speed: median of {rounds} round(s) (spread = min..max of the rounds); \
         MiB/s and conn/s: higher is better, µs: lower is better"
    );
    println!(
        "{:<36} {:<7} {:>11} {:>8} {:>21} {:>10}",
        "metric", "path", "median", "unit", "spread", "vs direct"
    );
    for metric in [
        Metric::BulkOneWay,
        Metric::BulkEcho,
        Metric::RttMedian,
        Metric::RttP99,
        Metric::ConnRate,
    ] {
        let direct = results.median(metric, "direct");
        for (i, &path) in paths.iter().enumerate() {
            let Some(value) = results.median(metric, path) else {
                continue;
            };
            let (min, max) = results.spread(metric, path).unwrap_or((value, value));
            let d = metric.decimals();
            let ratio = direct.map_or("-".to_string(), |direct| format!("{:.2}", value / direct));
            println!(
                "{:<36} {:<7} {:>11} {:>8} {:>21} {:>10}",
                if i == 0 { metric.label() } else { "" },
                path,
                fmt_value(value, d),
                metric.unit(),
                format!("{}..{}", fmt_value(min, d), fmt_value(max, d)),
                ratio
            );
        }
    }

    let proxies: Vec<&str> = paths.iter().copied().filter(|&p| p != "direct").collect();
    println!();
    println!(
        "proxy cost: median of {rounds} round(s); CPU = user + system time of the proxy \
         (socat: listener + reaped children), 10 ms ticks"
    );
    print!("{:<46} {:>6}", "metric", "unit");
    for path in &proxies {
        print!(" {path:>10}");
    }
    println!(" {:>13}", "router/socat");
    for metric in [
        Metric::CpuOneWay,
        Metric::CpuEcho,
        Metric::CpuRtt,
        Metric::CpuConns,
        Metric::MemIdle,
        Metric::MemIdleConns,
        Metric::MemPerConn,
        Metric::PssIdleConns,
        Metric::PssPerConn,
        Metric::ProcsIdleConns,
        Metric::MemPeakOneWay,
        Metric::MemPeakEcho,
    ] {
        print!("{:<46} {:>6}", metric.label(), metric.unit());
        for path in &proxies {
            let cell = results
                .median(metric, path)
                .map_or("-".to_string(), |v| fmt_value(v, metric.decimals()));
            print!(" {cell:>10}");
        }
        let ratio = match (
            results.median(metric, "router"),
            results.median(metric, "socat"),
        ) {
            (Some(router), Some(socat)) if socat > 0.0 => format!("{:.2}", router / socat),
            _ => "-".to_string(),
        };
        println!(" {ratio:>13}");
    }

    if paths.contains(&"socat") {
        println!();
        print!("router / socat (ratio of medians):");
        for (metric, name) in [
            (Metric::BulkOneWay, "bulk one way"),
            (Metric::BulkEcho, "bulk both ways"),
            (Metric::RttMedian, "RTT median"),
            (Metric::RttP99, "RTT p99"),
            (Metric::ConnRate, "conn rate"),
        ] {
            let router = results.median(metric, "router");
            let socat = results.median(metric, "socat");
            if let (Some(router), Some(socat)) = (router, socat) {
                print!(" {name} {:.2};", router / socat);
            }
        }
        println!(" (> 1: router higher)");
    }
}

fn print_first_use(first_use: &Results, fresh: &[(&'static str, Mem)]) {
    println!();
    println!(
        "first use of a fresh proxy (one sample each, taken before the warm-up; RSS before any \
         connection, then the first 200 idle connections, then the first bulk transfers)"
    );
    print!("{:<46} {:>6}", "metric", "unit");
    for (path, _) in fresh {
        print!(" {path:>10}");
    }
    println!();
    print!("{:<46} {:>6}", "RSS before any connection", "KiB");
    for (_, mem) in fresh {
        print!(" {:>10}", mem.rss_kib);
    }
    println!();
    print!("{:<46} {:>6}", "PSS before any connection", "KiB");
    for (_, mem) in fresh {
        print!(" {:>10}", mem.pss_kib);
    }
    println!();
    for metric in [
        Metric::MemIdle,
        Metric::MemIdleConns,
        Metric::MemPerConn,
        Metric::PssIdleConns,
        Metric::PssPerConn,
        Metric::MemPeakOneWay,
        Metric::MemPeakEcho,
    ] {
        print!("{:<46} {:>6}", metric.label(), metric.unit());
        for (path, _) in fresh {
            let cell = first_use
                .median(metric, path)
                .map_or("-".to_string(), |v| fmt_value(v, metric.decimals()));
            print!(" {cell:>10}");
        }
        println!();
    }
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|_| "?".into())
}

fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok()?.parse().ok()
}

fn first_line(command: &mut Command) -> String {
    command
        .output()
        .ok()
        .map(|out| {
            let text = if out.stdout.is_empty() {
                out.stderr
            } else {
                out.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .find(|line| !line.trim().is_empty())
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

/// `socat version 1.7.4.4`, from the second line of `socat -V`.
fn socat_version() -> String {
    Command::new("socat")
        .arg("-V")
        .output()
        .ok()
        .and_then(|out| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .find(|line| line.starts_with("socat version"))
                .map(|line| line.split(" on ").next().unwrap_or(line).to_string())
        })
        .unwrap_or_else(|| "socat: not found".into())
}

// ---------------------------------------------------------------------------------------------
// The run.

/// One measurement; each round runs every step on every path.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Step {
    BulkOneWay,
    BulkEcho,
    Latency,
    Conns,
    IdleMemory,
}

/// Sizes of one pass: the real ones, or small ones for the warm-up.
struct Sizes {
    one_way: usize,
    echo: usize,
    round_trips: usize,
    conns: usize,
    idle: usize,
}

fn run_step(step: Step, target: &Target, sizes: &Sizes, results: Option<&mut Results>) {
    let path = target.socket.as_path();
    let name = target.name;
    let pid = target.proxy_pid();
    let fail = |what: &str, err: io::Error| -> ! { panic!("{name}: {what}: {err}") };
    let mut recorded: Vec<(Metric, f64)> = Vec::new();
    let cpu_before = pid.map(cpu_ms);
    match step {
        Step::BulkOneWay | Step::BulkEcho => {
            let sampler = pid.map(|pid| Sampler::start(pid, target.forks));
            let (speed, bytes) = if step == Step::BulkOneWay {
                let speed = bulk_one_way(path, sizes.one_way)
                    .unwrap_or_else(|err| fail("bulk one way", err));
                (speed, sizes.one_way)
            } else {
                let speed =
                    bulk_echo(path, sizes.echo).unwrap_or_else(|err| fail("bulk both ways", err));
                (speed, sizes.echo)
            };
            let peak = sampler.map(Sampler::finish);
            target.settle();
            let (speed_metric, peak_metric, cpu_metric) = if step == Step::BulkOneWay {
                (Metric::BulkOneWay, Metric::MemPeakOneWay, Metric::CpuOneWay)
            } else {
                (Metric::BulkEcho, Metric::MemPeakEcho, Metric::CpuEcho)
            };
            recorded.push((speed_metric, speed));
            if let (Some(pid), Some(before), Some(peak)) = (pid, cpu_before, peak) {
                let per_gib = (cpu_ms(pid) - before) * (1u64 << 30) as f64 / bytes as f64;
                recorded.push((cpu_metric, per_gib));
                recorded.push((peak_metric, peak as f64));
            }
        }
        Step::Latency => {
            let (p50, p99) =
                round_trips(path, sizes.round_trips).unwrap_or_else(|err| fail("round trips", err));
            target.settle();
            recorded.push((Metric::RttMedian, p50));
            recorded.push((Metric::RttP99, p99));
            if let (Some(pid), Some(before)) = (pid, cpu_before) {
                // The 100 warm-up round trips count too; they are 0.5 % of the total.
                let per_1000 = (cpu_ms(pid) - before) * 1000.0 / sizes.round_trips as f64;
                recorded.push((Metric::CpuRtt, per_1000));
            }
        }
        Step::Conns => {
            let rate = connection_rate(path, sizes.conns)
                .unwrap_or_else(|err| fail("connection rate", err));
            target.settle();
            recorded.push((Metric::ConnRate, rate));
            if let (Some(pid), Some(before)) = (pid, cpu_before) {
                let per_1000 = (cpu_ms(pid) - before) * 1000.0 / sizes.conns as f64;
                recorded.push((Metric::CpuConns, per_1000));
            }
        }
        Step::IdleMemory => {
            let Some(pid) = pid else {
                return;
            };
            let idle = mem_of_tree(pid);
            let conns = open_idle(path, sizes.idle)
                .unwrap_or_else(|err| fail("opening idle connections", err));
            thread::sleep(Duration::from_millis(100));
            let held = mem_of_tree(pid);
            drop(conns);
            target.settle();
            let per = |with: u64, without: u64| (with as f64 - without as f64) / sizes.idle as f64;
            recorded.push((Metric::MemIdle, idle.rss_kib as f64));
            recorded.push((Metric::MemIdleConns, held.rss_kib as f64));
            recorded.push((Metric::MemPerConn, per(held.rss_kib, idle.rss_kib)));
            recorded.push((Metric::PssIdleConns, held.pss_kib as f64));
            recorded.push((Metric::PssPerConn, per(held.pss_kib, idle.pss_kib)));
            recorded.push((Metric::ProcsIdleConns, held.processes as f64));
        }
    }
    if let Some(results) = results {
        for (metric, value) in recorded {
            results.record(metric, name, value);
        }
    }
}

#[test]
#[ignore = "benchmark: cargo test --release --test bench -- --ignored --nocapture"]
fn bench_direct_router_socat() {
    let done = Arc::new(AtomicBool::new(false));
    start_watchdog(WATCHDOG, Arc::clone(&done));
    let run_started = Instant::now();
    let rounds = env_number("DSR_BENCH_ROUNDS").map_or(DEFAULT_ROUNDS, |n| n.max(1) as usize);
    let budget = env_number("DSR_BENCH_BUDGET_SECS").map_or(DEFAULT_BUDGET, Duration::from_secs);
    let router_bin = env!("CARGO_BIN_EXE_docker-socket-router");
    let buffer_size = std::env::var("DSR_BENCH_BUFFER_SIZE").ok();

    let dir = TempDir(std::env::temp_dir().join(format!("dsr-bench-{}", std::process::id())));
    let _ = fs::remove_dir_all(&dir.0);
    fs::create_dir_all(&dir.0).unwrap();
    let uid = nix::unistd::getuid().as_raw();
    let upstream = dir.0.join(format!("{uid}.sock"));
    start_upstream(&upstream).unwrap();

    println!(
        "bench: {} build; router {} (--buffer-size {}); {}; {} CPUs; load average {} at start",
        if cfg!(debug_assertions) {
            "DEBUG (figures are meaningless: run with --release)"
        } else {
            "release"
        },
        first_line(Command::new(router_bin).arg("--version")),
        buffer_size.as_deref().unwrap_or("default"),
        socat_version(),
        thread::available_parallelism().map_or(0, |n| n.get()),
        loadavg()
    );

    let mut targets = vec![Target {
        name: "direct",
        socket: upstream.clone(),
        proxy: None,
        forks: false,
    }];

    let router_socket = dir.0.join("router.sock");
    let router = Proc::spawn(
        "router",
        Command::new(router_bin)
            .arg("--socket")
            .arg(&router_socket)
            .arg("--user-socket")
            .arg(dir.0.join("%d.sock"))
            .args(["--log-target", "stderr"])
            .args(["--max-connections", "1024"])
            .args(["--max-connections-per-user", "1024"])
            .args(buffer_size.iter().flat_map(|size| ["--buffer-size", size])),
        dir.0.join("router.log"),
    )
    .unwrap();
    targets.push(Target {
        name: "router",
        socket: router_socket,
        proxy: Some(router),
        forks: false,
    });

    let socat_socket = dir.0.join("socat.sock");
    let socat = Proc::spawn(
        "socat",
        Command::new("socat").args([
            "-t".to_string(),
            "5".to_string(),
            format!("UNIX-LISTEN:{},fork,reuseaddr", socat_socket.display()),
            format!("UNIX-CONNECT:{}", upstream.display()),
        ]),
        dir.0.join("socat.log"),
    );
    match socat {
        Ok(socat) => targets.push(Target {
            name: "socat",
            socket: socat_socket,
            proxy: Some(socat),
            forks: true,
        }),
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            println!("bench: socat is not installed: its column is skipped");
        }
        Err(err) => panic!("cannot start socat: {err}"),
    }

    let mut fresh: Vec<(&str, Mem)> = Vec::new();
    for target in targets.iter_mut() {
        if let Some(mem) = wait_until_serving(target) {
            fresh.push((target.name, mem));
        }
    }
    let sizes = Sizes {
        one_way: BULK_ONE_WAY,
        echo: BULK_ECHO,
        round_trips: RTT_COUNT,
        conns: CONNS,
        idle: IDLE_CONNS,
    };
    // What a fresh proxy's memory grows by the first time it holds 200 connections or carries
    // a bulk transfer: later rounds reuse memory the allocator (and the router's slab) kept.
    let mut first_use = Results::default();
    for target in targets.iter().filter(|t| t.proxy.is_some()) {
        for step in [Step::IdleMemory, Step::BulkOneWay, Step::BulkEcho] {
            run_step(step, target, &sizes, Some(&mut first_use));
        }
    }

    let steps = [
        Step::BulkOneWay,
        Step::BulkEcho,
        Step::Latency,
        Step::Conns,
        Step::IdleMemory,
    ];
    let warm_up = Sizes {
        one_way: 16 << 20,
        echo: 4 << 20,
        round_trips: 1_000,
        conns: 100,
        idle: 20,
    };
    for target in &targets {
        for step in steps {
            run_step(step, target, &warm_up, None);
        }
    }
    println!(
        "bench: warm-up done after {:.1} s",
        run_started.elapsed().as_secs_f64()
    );

    let mut results = Results::default();
    let mut done_rounds = 0;
    for round in 0..rounds {
        let round_started = Instant::now();
        for step in steps {
            for i in 0..targets.len() {
                let target = &targets[(i + round) % targets.len()];
                run_step(step, target, &sizes, Some(&mut results));
            }
        }
        for target in targets.iter_mut() {
            if let Some(proxy) = target.proxy.as_mut() {
                proxy.check_running();
            }
        }
        done_rounds += 1;
        let took = round_started.elapsed();
        println!(
            "bench: round {}/{rounds} took {:.1} s (load average {})",
            round + 1,
            took.as_secs_f64(),
            loadavg()
        );
        if done_rounds >= MIN_ROUNDS && run_started.elapsed() + took > budget {
            if done_rounds < rounds {
                println!(
                    "bench: stopping after {done_rounds} rounds: the {} s budget would be exceeded",
                    budget.as_secs()
                );
            }
            break;
        }
    }

    let paths: Vec<&'static str> = targets.iter().map(|t| t.name).collect();
    print_report(&results, &paths, done_rounds);

    print_first_use(&first_use, &fresh);
    println!();
    for target in targets.iter_mut() {
        if let Some(pid) = target.proxy_pid() {
            let mem = mem_of_tree(pid);
            let hwm = status_kib(pid, "VmHWM").unwrap_or(0);
            println!(
                "{}: RSS idle after all rounds {} KiB (PSS {} KiB), VmHWM of the main process {} KiB",
                target.name, mem.rss_kib, mem.pss_kib, hwm
            );
        }
        if let Some(proxy) = target.proxy.as_mut() {
            let status = proxy.stop(Duration::from_secs(5));
            println!("{}: SIGTERM -> {status}", target.name);
        }
    }
    println!(
        "bench: {} rounds in {:.1} s; load average {} at the end",
        done_rounds,
        run_started.elapsed().as_secs_f64(),
        loadavg()
    );
    done.store(true, Ordering::Relaxed);
}
