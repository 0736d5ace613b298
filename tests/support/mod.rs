//! Shared helpers for the integration tests: temporary directories, the real router process,
//! fake per-user upstream daemons, and clients that connect as other uids.
//!
//! Clients as other uids: the router identifies a client by `SO_PEERCRED`, which the kernel
//! records when the client process calls `connect`. [`connect_as`] re-executes this very test
//! binary as a child process running under the wanted uid and gid (`CommandExt::uid`/`gid`,
//! which also drops supplementary groups). The child connects to the router, hands each connected
//! socket back over its stdin (a `SOCK_SEQPACKET` pair) with `SCM_RIGHTS`, closes its own copy,
//! and stays alive until the test drops the client, so the pid the router logs is a live process.
//! The test then does every read and write itself, with timeouts. Each test file that connects
//! as another uid must declare
//! `#[test] fn client_helper() { support::client_helper(); }`: it does nothing unless the
//! helper's environment variable is set. Without root the uid cannot change: [`test_uid`] then
//! gives our own uid, tests that need other users call [`skip_without_root`].
//!
//! Every wait here is bounded; a test that fails prints the router's log.

#![allow(dead_code)] // each test binary uses a different part

use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::libc;
use nix::sys::signal::{Signal, kill};
use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, UnixAddr, bind, connect, listen, socket, socketpair,
};
use nix::unistd::Pid;

/// The router binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_docker-socket-router");

/// The default bound for one wait in a test.
pub const WAIT: Duration = Duration::from_secs(10);

/// An answer that comes "at once": well under the router's 2 s request-head timeout, so it was
/// not the timeout that produced it, with room for a loaded machine.
pub const QUICK: Duration = Duration::from_millis(1500);

const HELPER_SOCKET_ENV: &str = "DSR_TEST_CLIENT_SOCKET";
const HELPER_COUNT_ENV: &str = "DSR_TEST_CLIENT_COUNT";

// ---------------------------------------------------------------------------------------------
// Users

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Says the test is skipped and returns true when not running as root.
pub fn skip_without_root() -> bool {
    if is_root() {
        false
    } else {
        eprintln!("skipped: needs root");
        true
    }
}

pub fn own_uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

pub fn own_gid() -> u32 {
    nix::unistd::getegid().as_raw()
}

/// `uid` when we can switch to it (root), else our own uid. Each test passes its own uid so
/// tests running in parallel never share one.
pub fn test_uid(uid: u32) -> u32 {
    if is_root() { uid } else { own_uid() }
}

/// The gid a client of `uid` runs with: the same number (root), or our own gid.
pub fn gid_for(uid: u32) -> u32 {
    if uid == own_uid() { own_gid() } else { uid }
}

// ---------------------------------------------------------------------------------------------
// Temporary directories

static NEXT_DIR: AtomicUsize = AtomicUsize::new(0);

/// A directory removed on drop; mode 0755 so clients of other uids can reach sockets in it.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let base = std::env::temp_dir()
            .canonicalize()
            .unwrap_or_else(|_| PathBuf::from("/tmp"));
        let n = NEXT_DIR.fetch_add(1, Ordering::SeqCst);
        let path = base.join(format!("dsr-{tag}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        set_mode(&path, 0o755);
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }

    /// Creates (if needed) a 0755 subdirectory and returns its path.
    pub fn subdir(&self, name: &str) -> PathBuf {
        let path = self.path.join(name);
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        set_mode(&path, 0o755);
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

pub fn set_mode(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

pub fn chown(path: &Path, uid: u32) {
    if uid != own_uid() {
        std::os::unix::fs::chown(path, Some(uid), Some(gid_for(uid)))
            .unwrap_or_else(|e| panic!("chown {} to {uid}: {e}", path.display()));
    }
}

/// The mode bits and whether the path is a socket, without following a symlink.
pub fn socket_mode(path: &Path) -> Option<u32> {
    let meta = fs::symlink_metadata(path).ok()?;
    meta.file_type()
        .is_socket()
        .then(|| meta.permissions().mode() & 0o7777)
}

// ---------------------------------------------------------------------------------------------
// Captured output of a child process

#[derive(Default)]
struct Lines {
    lines: Vec<String>,
    eof: bool,
}

/// Lines read from a pipe by a background thread; waits on them are bounded.
#[derive(Clone, Default)]
pub struct Output {
    inner: Arc<(Mutex<Lines>, Condvar)>,
}

impl Output {
    fn capture(pipe: impl Read + Send + 'static) -> Output {
        let output = Output::default();
        let writer = output.clone();
        thread::spawn(move || {
            let reader = BufReader::new(pipe);
            for line in reader.split(b'\n') {
                let Ok(line) = line else { break };
                let (lock, cv) = &*writer.inner;
                let mut state = lock.lock().unwrap();
                state
                    .lines
                    .push(String::from_utf8_lossy(&line).into_owned());
                cv.notify_all();
            }
            let (lock, cv) = &*writer.inner;
            lock.lock().unwrap().eof = true;
            cv.notify_all();
        });
        output
    }

    pub fn lines(&self) -> Vec<String> {
        self.inner.0.lock().unwrap().lines.clone()
    }

    pub fn text(&self) -> String {
        self.lines().join("\n")
    }

    /// Waits until the pipe reached end of file (the process and its children closed it).
    pub fn wait_eof(&self, timeout: Duration) -> bool {
        let (lock, cv) = &*self.inner;
        let guard = lock.lock().unwrap();
        let (guard, _) = cv
            .wait_timeout_while(guard, timeout, |state| !state.eof)
            .unwrap();
        guard.eof
    }

    /// Waits for a line matching `pred`; returns it, or `None` after `timeout`.
    pub fn find(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        self.find_all(1, timeout, pred).and_then(|mut v| v.pop())
    }

    /// Waits until `count` lines match `pred`; returns the first `count` of them.
    pub fn find_all(
        &self,
        count: usize,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Option<Vec<String>> {
        let (lock, cv) = &*self.inner;
        let deadline = Instant::now() + timeout;
        let mut state = lock.lock().unwrap();
        loop {
            let found: Vec<String> = state
                .lines
                .iter()
                .filter(|line| pred(line))
                .take(count)
                .cloned()
                .collect();
            if found.len() == count {
                return Some(found);
            }
            let now = Instant::now();
            if now >= deadline || state.eof {
                return None;
            }
            state = cv.wait_timeout(state, deadline - now).unwrap().0;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The router process

/// The router binary running as a child process; killed on drop. Its stderr and stdout are
/// captured line by line; on a failing test the log is printed.
pub struct Router {
    child: Child,
    pub socket: PathBuf,
    pub template: String,
    pub stderr: Output,
    pub stdout: Output,
    exited: Option<ExitStatus>,
}

impl Router {
    /// Starts the router on `<dir>/router.sock` routing to `<dir>/up/%d.sock`, logging to stderr
    /// unless `args` choose a log target, and waits until its socket is in place.
    pub fn start(dir: &TempDir, args: &[&str]) -> Router {
        let up = dir.subdir("up");
        let template = format!("{}/%d.sock", up.display());
        Router::start_with(&dir.join("router.sock"), &template, args)
    }

    /// Starts the router on `socket` with the upstream `template` and waits until it listens.
    pub fn start_with(socket: &Path, template: &str, args: &[&str]) -> Router {
        let mut all: Vec<String> = vec![
            "--socket".into(),
            socket.display().to_string(),
            "--user-socket".into(),
            template.into(),
        ];
        if !args.contains(&"--log-target") {
            all.extend(["--log-target".into(), "stderr".into()]);
        }
        all.extend(args.iter().map(|s| s.to_string()));
        let mut router = Router::spawn(&all);
        router.socket = socket.to_path_buf();
        router.template = template.to_string();
        router.wait_listening();
        router
    }

    /// Like [`Router::start`], with at most `nofile` open descriptors (`ulimit -n`).
    pub fn start_with_nofile(dir: &TempDir, nofile: u32, args: &[&str]) -> Router {
        let up = dir.subdir("up");
        let socket = dir.join("router.sock");
        let template = format!("{}/%d.sock", up.display());
        let mut command = Command::new("/bin/sh");
        command
            .arg("-c")
            .arg(format!("ulimit -n {nofile} && exec \"$0\" \"$@\""))
            .arg(BIN)
            .args(["--socket", &socket.display().to_string()])
            .args(["--user-socket", &template, "--log-target", "stderr"])
            .args(args);
        let mut router = Router::spawn_command(command);
        router.socket = socket;
        router.template = template;
        router.wait_listening();
        router
    }

    /// Runs the binary with exactly `args`, without waiting for anything.
    pub fn spawn<S: AsRef<str>>(args: &[S]) -> Router {
        let mut command = Command::new(BIN);
        command.args(args.iter().map(AsRef::as_ref));
        Router::spawn_command(command)
    }

    fn spawn_command(mut command: Command) -> Router {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {command:?}: {e}"));
        let stderr = Output::capture(child.stderr.take().expect("stderr is piped"));
        let stdout = Output::capture(child.stdout.take().expect("stdout is piped"));
        Router {
            child,
            socket: PathBuf::new(),
            template: String::new(),
            stderr,
            stdout,
            exited: None,
        }
    }

    fn wait_listening(&mut self) {
        let deadline = Instant::now() + WAIT;
        loop {
            if socket_mode(&self.socket).is_some() {
                return;
            }
            if let Some(status) = self.try_exit() {
                panic!(
                    "the router exited ({status}) instead of listening on {}:\n{}",
                    self.socket.display(),
                    self.stderr.text()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "the router did not listen on {} within {WAIT:?}:\n{}",
                    self.socket.display(),
                    self.stderr.text()
                );
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The upstream socket path of `uid` under this router's template.
    pub fn upstream_path(&self, uid: u32) -> PathBuf {
        PathBuf::from(self.template.replace("%d", &uid.to_string()))
    }

    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), signal)
            .unwrap_or_else(|e| panic!("kill -{signal} router: {e}"));
    }

    fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    /// Waits for the process to exit; `None` if it still runs after `timeout`.
    pub fn wait_exit_within(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit() {
                // Let the capture threads see the last lines.
                self.stderr.wait_eof(Duration::from_secs(2));
                self.stdout.wait_eof(Duration::from_secs(2));
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for the process to exit; panics (with the log) after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        match self.wait_exit_within(timeout) {
            Some(status) => status,
            None => panic!(
                "the router still runs after {timeout:?}:\n{}",
                self.stderr.text()
            ),
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.try_exit().is_none()
    }

    /// Waits for a log line containing every one of `needles`; panics with the log on timeout.
    pub fn wait_log(&self, needles: &[&str], timeout: Duration) -> String {
        self.stderr
            .find(timeout, |line| needles.iter().all(|n| line.contains(n)))
            .unwrap_or_else(|| {
                panic!(
                    "no log line with {needles:?} within {timeout:?}:\n{}",
                    self.stderr.text()
                )
            })
    }

    /// Waits until `count` finished-connection lines were logged and returns them.
    pub fn wait_conn_lines(&self, count: usize, timeout: Duration) -> Vec<String> {
        self.stderr
            .find_all(count, timeout, is_conn_line)
            .unwrap_or_else(|| {
                panic!(
                    "fewer than {count} connection lines within {timeout:?}:\n{}",
                    self.stderr.text()
                )
            })
    }

    /// Waits for the one finished-connection line of `uid`.
    pub fn wait_conn_line(&self, uid: u32, timeout: Duration) -> String {
        let needle = format!(" uid={uid} ");
        self.stderr
            .find(timeout, |line| is_conn_line(line) && line.contains(&needle))
            .unwrap_or_else(|| {
                panic!(
                    "no connection line for uid {uid} within {timeout:?}:\n{}",
                    self.stderr.text()
                )
            })
    }

    /// The finished-connection lines logged so far.
    pub fn conn_lines(&self) -> Vec<String> {
        self.stderr
            .lines()
            .into_iter()
            .filter(|l| is_conn_line(l))
            .collect()
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        if self.try_exit().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if thread::panicking() {
            eprintln!(
                "---- router log ({}) ----\n{}\n---- end of router log ----",
                self.socket.display(),
                self.stderr.text()
            );
        }
    }
}

/// Whether a log line is the one line of a finished connection.
pub fn is_conn_line(line: &str) -> bool {
    line.contains(" conn=") && line.contains(" outcome=") && line.contains(" duration_ms=")
}

/// The value of `key=` in a log line (up to the next space; a quoted value up to its quote).
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let pattern = format!(" {key}=");
    let start = line.find(&pattern)? + pattern.len();
    let rest = &line[start..];
    if let Some(quoted) = rest.strip_prefix('"') {
        return quoted.find('"').map(|end| &quoted[..end]);
    }
    Some(rest.split(' ').next().unwrap_or(""))
}

/// Runs the binary with `args` until it exits (bounded) and returns status, stdout and stderr.
pub fn run_router(args: &[&str], timeout: Duration) -> (ExitStatus, String, String) {
    let mut router = Router::spawn(args);
    let status = router.wait_exit(timeout);
    (status, router.stdout.text(), router.stderr.text())
}

/// A `Vm...:` line of `/proc/<pid>/status` (for example `VmHWM`, `VmData`), in KiB.
pub fn proc_status_kib(pid: u32, key: &str) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{key} in /proc/{pid}/status"))
}

/// Resident memory high-water mark of a process, in KiB.
pub fn vm_hwm_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmHWM")
}

/// Clock ticks (usually 10 ms) of CPU time a process used so far, user plus system.
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc stat");
    let after_name = &stat[stat.rfind(')').expect("a stat line") + 2..];
    let fields: Vec<&str> = after_name.split(' ').collect();
    // utime and stime are fields 14 and 15 of proc_pid_stat(5); `after_name` starts at field 3.
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

// ---------------------------------------------------------------------------------------------
// Fake upstream daemons

/// A listening socket standing in for one user's Docker daemon, owned by that user.
pub struct Upstream {
    pub path: PathBuf,
    pub uid: u32,
    pub listener: UnixListener,
}

impl Upstream {
    /// Binds `path` (default backlog) and gives the socket to `uid`.
    pub fn bind(path: &Path, uid: u32) -> Upstream {
        let listener =
            UnixListener::bind(path).unwrap_or_else(|e| panic!("bind {}: {e}", path.display()));
        chown(path, uid);
        Upstream {
            path: path.to_path_buf(),
            uid,
            listener,
        }
    }

    /// Binds `path` with an explicit listen backlog and gives the socket to `uid`.
    pub fn bind_with_backlog(path: &Path, uid: u32, backlog: i32) -> Upstream {
        let fd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .expect("socket");
        let addr = UnixAddr::new(path).expect("socket address");
        bind(fd.as_raw_fd(), &addr).unwrap_or_else(|e| panic!("bind {}: {e}", path.display()));
        listen(&fd, Backlog::new(backlog).expect("backlog")).expect("listen");
        chown(path, uid);
        Upstream {
            path: path.to_path_buf(),
            uid,
            listener: UnixListener::from(fd),
        }
    }

    /// Accepts one connection within `timeout`; blocking, with 20 s I/O timeouts.
    pub fn try_accept(&self, timeout: Duration) -> Option<UnixStream> {
        self.listener.set_nonblocking(true).expect("nonblocking");
        let deadline = Instant::now() + timeout;
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    prepare(&stream);
                    return Some(stream);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return None;
                    }
                    thread::sleep(Duration::from_millis(2));
                }
                Err(e) => panic!("accept on {}: {e}", self.path.display()),
            }
        }
    }

    pub fn accept(&self) -> UnixStream {
        self.try_accept(WAIT).unwrap_or_else(|| {
            panic!(
                "no connection reached {} within {WAIT:?}",
                self.path.display()
            )
        })
    }

    /// Asserts that no connection is waiting to be accepted.
    pub fn assert_no_connection(&self) {
        if let Some(stream) = self.try_accept(Duration::ZERO) {
            panic!(
                "{} got a connection it must not get (from {:?})",
                self.path.display(),
                nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
            );
        }
    }

    /// Connects without blocking until the accept queue is full; keep the result to keep it full.
    pub fn fill_backlog(&self) -> Vec<OwnedFd> {
        let mut held = Vec::new();
        let addr = UnixAddr::new(&self.path).expect("socket address");
        for _ in 0..256 {
            let fd = socket(
                AddressFamily::Unix,
                SockType::Stream,
                SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
                None,
            )
            .expect("socket");
            match connect(fd.as_raw_fd(), &addr) {
                Ok(()) => held.push(fd),
                Err(nix::errno::Errno::EAGAIN) => return held,
                Err(e) => panic!("filling the backlog of {}: {e}", self.path.display()),
            }
        }
        panic!(
            "the backlog of {} did not fill up after {} connections",
            self.path.display(),
            held.len()
        );
    }

    /// Serves every connection with `handler`, each in its own thread, until dropped.
    pub fn serve<F>(self, handler: F) -> Server
    where
        F: Fn(UnixStream) + Send + Sync + 'static,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let path = self.path.clone();
        let handler = Arc::new(handler);
        let thread = {
            let stop = stop.clone();
            let accepted = accepted.clone();
            thread::spawn(move || {
                self.listener.set_nonblocking(true).expect("nonblocking");
                while !stop.load(Ordering::SeqCst) {
                    match self.listener.accept() {
                        Ok((stream, _)) => {
                            prepare(&stream);
                            accepted.fetch_add(1, Ordering::SeqCst);
                            let handler = handler.clone();
                            thread::spawn(move || handler(stream));
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            thread::sleep(Duration::from_millis(1));
                        }
                        Err(_) => break,
                    }
                }
            })
        };
        Server {
            path,
            stop,
            accepted,
            thread: Some(thread),
        }
    }

    /// Echoes every byte back; passes end of stream on after the last one.
    pub fn echo(self) -> Server {
        self.serve(echo)
    }
}

fn prepare(stream: &UnixStream) {
    stream.set_nonblocking(false).expect("blocking");
    stream.set_read_timeout(Some(Duration::from_secs(20))).ok();
    stream.set_write_timeout(Some(Duration::from_secs(20))).ok();
}

/// Echoes until end of stream, then shuts down its write side.
pub fn echo(mut stream: UnixStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Write);
}

/// A running fake upstream; stops accepting on drop.
pub struct Server {
    pub path: PathBuf,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Clients

/// The child process that connected as another uid, and our end of its control socket. The child
/// stays alive (so the pid the router logged stays valid) until this is dropped with the last
/// connection it made.
struct Helper {
    child: Child,
    _control: UnixStream,
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client connection to the router, made by a process running as `uid`.
pub struct Conn {
    pub stream: UnixStream,
    /// The pid of the process that called `connect` (what `SO_PEERCRED` reports).
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    _helper: Option<Arc<Helper>>,
}

impl std::ops::Deref for Conn {
    type Target = UnixStream;
    fn deref(&self) -> &UnixStream {
        &self.stream
    }
}

impl std::ops::DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut UnixStream {
        &mut self.stream
    }
}

impl Conn {
    fn new(stream: UnixStream, pid: u32, uid: u32, helper: Option<Arc<Helper>>) -> Conn {
        stream.set_read_timeout(Some(WAIT)).ok();
        stream.set_write_timeout(Some(WAIT)).ok();
        Conn {
            stream,
            pid,
            uid,
            gid: gid_for(uid),
            _helper: helper,
        }
    }
}

/// Connects to `socket` as `uid` (see the module doc); panics if the connect fails.
pub fn connect_as(socket: &Path, uid: u32) -> Conn {
    connect_many_as(socket, uid, 1)
        .unwrap_or_else(|e| panic!("connect to {} as uid {uid}: {e}", socket.display()))
        .pop()
        .expect("one connection")
}

/// Opens `count` connections to `socket` from one process running as `uid`, back to back.
pub fn connect_many_as(socket: &Path, uid: u32, count: usize) -> Result<Vec<Conn>, String> {
    if uid == own_uid() {
        return (0..count)
            .map(|_| {
                UnixStream::connect(socket)
                    .map(|s| Conn::new(s, std::process::id(), uid, None))
                    .map_err(|e| e.to_string())
            })
            .collect();
    }
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| format!("socketpair: {e}"))?;
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let child = {
        let mut command = Command::new(exe);
        command
            .args([
                "client_helper",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(HELPER_SOCKET_ENV, socket)
            .env(HELPER_COUNT_ENV, count.to_string())
            .uid(uid)
            .gid(gid_for(uid))
            .stdin(Stdio::from(theirs))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        command.spawn().map_err(|e| format!("spawn helper: {e}"))?
        // `command` (with the child's end of the pair) is dropped here.
    };
    let pid = child.id();
    let control = UnixStream::from(ours);
    let mut streams = Vec::with_capacity(count);
    let received = control
        .set_read_timeout(Some(WAIT))
        .map_err(|e| e.to_string())
        .and_then(|()| {
            for _ in 0..count {
                streams.push(receive_conn(control.as_raw_fd())?);
            }
            Ok(())
        });
    let helper = Arc::new(Helper {
        child,
        _control: control,
    });
    received?;
    Ok(streams
        .into_iter()
        .map(|stream| Conn::new(stream, pid, uid, Some(helper.clone())))
        .collect())
}

fn receive_conn(control: RawFd) -> Result<UnixStream, String> {
    let (data, fd) = recv_message(control).map_err(|e| format!("waiting for the helper: {e}"))?;
    match fd {
        Some(fd) => Ok(UnixStream::from(fd)),
        None if data.is_empty() => Err("the helper exited without connecting".into()),
        None => Err(String::from_utf8_lossy(&data).into_owned()),
    }
}

/// Room for one `SCM_RIGHTS` message with one descriptor, suitably aligned.
fn cmsg_buffer() -> (Vec<u64>, usize) {
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
    (vec![0u64; space.div_ceil(8)], space)
}

/// Sends `data` and, if given, one descriptor over a Unix socket.
fn send_message(socket: RawFd, data: &[u8], fd: Option<RawFd>) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let (mut control, space) = cmsg_buffer();
    // SAFETY: a zeroed msghdr is valid; every pointer in it points into live buffers above, and
    // the control message is written inside `control`, which has CMSG_SPACE bytes.
    let sent = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if let Some(fd) = fd {
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = space as _;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
        }
        libc::sendmsg(socket, &msg, 0)
    };
    if sent < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Receives one message and the descriptor it carries, if any (close-on-exec).
fn recv_message(socket: RawFd) -> io::Result<(Vec<u8>, Option<OwnedFd>)> {
    let mut data = [0u8; 512];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    let (mut control, space) = cmsg_buffer();
    let mut fd = None;
    // SAFETY: as in `send_message`; the kernel fills at most `space` control bytes, and each
    // descriptor it passes is new and ours to own.
    let received = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let received = libc::recvmsg(socket, &mut msg, libc::MSG_CMSG_CLOEXEC);
        if received >= 0 {
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                    let raw = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>());
                    fd = Some(OwnedFd::from_raw_fd(raw));
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
        }
        received
    };
    if received < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((data[..received as usize].to_vec(), fd))
}

/// The client side of [`connect_as`]: does nothing unless started as the helper.
pub fn client_helper() {
    let Ok(socket) = std::env::var(HELPER_SOCKET_ENV) else {
        return;
    };
    let count: usize = std::env::var(HELPER_COUNT_ENV)
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1);
    let control = UnixStream::from(
        std::io::stdin()
            .as_fd()
            .try_clone_to_owned()
            .expect("dup stdin"),
    );
    for _ in 0..count {
        match UnixStream::connect(&socket) {
            Ok(stream) => {
                let sent = send_message(control.as_raw_fd(), b"k", Some(stream.as_raw_fd()));
                drop(stream); // the test holds the only copy now
                if sent.is_err() {
                    std::process::exit(1);
                }
            }
            Err(err) => {
                let text = format!("connect {socket}: {err}");
                let _ = send_message(control.as_raw_fd(), text.as_bytes(), None);
                std::process::exit(0);
            }
        }
    }
    // Stay alive (the router may log our pid) until the test closes its end, at most a minute.
    control.set_read_timeout(Some(Duration::from_secs(60))).ok();
    let mut buf = [0u8; 16];
    let _ = (&control).read(&mut buf);
    std::process::exit(0);
}

// ---------------------------------------------------------------------------------------------
// Bytes and HTTP

/// Deterministic pseudo-random bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

/// Reads until end of stream; panics if it does not come within `timeout`.
pub fn read_to_eof(stream: &mut UnixStream, timeout: Duration) -> Vec<u8> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            panic!(
                "no end of stream within {timeout:?}; got {} bytes: {:?}",
                out.len(),
                String::from_utf8_lossy(&out[..out.len().min(400)])
            );
        }
        stream.set_read_timeout(Some(left)).expect("read timeout");
        match stream.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut => {
            }
            Err(e) => panic!("read after {} bytes: {e}", out.len()),
        }
    }
}

/// Reads exactly `len` bytes within `timeout`.
pub fn read_exactly(stream: &mut UnixStream, len: usize, timeout: Duration) -> Vec<u8> {
    let deadline = Instant::now() + timeout;
    let mut out = vec![0u8; len];
    let mut filled = 0;
    while filled < len {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            panic!("only {filled} of {len} bytes within {timeout:?}");
        }
        stream.set_read_timeout(Some(left)).expect("read timeout");
        match stream.read(&mut out[filled..]) {
            Ok(0) => panic!("end of stream after {filled} of {len} bytes"),
            Ok(n) => filled += n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted
                        | io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("read after {filled} of {len} bytes: {e}"),
        }
    }
    out
}

/// An HTTP reply as the router sends it on a refusal.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub status_line: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn parse(bytes: &[u8]) -> Reply {
        let text = String::from_utf8_lossy(bytes);
        let split = bytes
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("no end of head in the reply: {text:?}"));
        let head = std::str::from_utf8(&bytes[..split]).expect("the head is text");
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default().to_string();
        let status = status_line
            .strip_prefix("HTTP/1.1 ")
            .and_then(|rest| rest.get(..3))
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP/1.1 status line: {status_line:?}"));
        let headers = lines
            .map(|line| {
                let (name, value) = line
                    .split_once(':')
                    .unwrap_or_else(|| panic!("bad header line {line:?}"));
                (name.trim().to_string(), value.trim().to_string())
            })
            .collect();
        Reply {
            status,
            status_line,
            headers,
            body: bytes[split + 4..].to_vec(),
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Asserts the Docker error shape: JSON content type, exact length, `Connection: close`,
    /// and a `{"message":"..."}` body (unless `head_only`).
    pub fn assert_docker_error(&self, status: u16, head_only: bool) {
        assert_eq!(self.status, status, "status of {self:?}");
        assert_eq!(
            self.header("Content-Type"),
            Some("application/json"),
            "{self:?}"
        );
        assert_eq!(self.header("Connection"), Some("close"), "{self:?}");
        let length: usize = self
            .header("Content-Length")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no Content-Length in {self:?}"));
        if head_only {
            assert!(self.body.is_empty(), "a HEAD reply has a body: {self:?}");
            assert!(length > 0, "{self:?}");
        } else {
            assert_eq!(length, self.body.len(), "Content-Length of {self:?}");
            let body = self.body_text();
            assert!(
                body.starts_with("{\"message\":\"docker-socket-router: ")
                    && body.ends_with("\"}\n"),
                "not a Docker error body: {body:?}"
            );
        }
    }
}

/// A minimal Docker CLI ping.
pub const PING: &[u8] = b"GET /_ping HTTP/1.1\r\nHost: docker\r\nUser-Agent: test\r\n\r\n";

/// Sends `request` and reads the whole reply until the router closes; returns it with the time
/// from the end of the request to the end of the reply.
pub fn exchange(conn: &mut Conn, request: &[u8], timeout: Duration) -> (Vec<u8>, Duration) {
    conn.write_all(request).expect("send the request");
    let sent = Instant::now();
    let reply = read_to_eof(conn, timeout);
    (reply, sent.elapsed())
}
