//! The router's life as a process: command line, listening socket (mode, lock, stale and live
//! sockets), signals and shutdown, and where its log lines go.
//!
//! Uids 20301..=20399 belong to this file (each test its own, so parallel tests never share one).

mod support;

use std::fs;
use std::io::{ErrorKind, Write};
use std::net::Shutdown;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use support::*;

#[test]
fn client_helper() {
    support::client_helper();
}

fn wait_gone(path: &Path, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while fs::symlink_metadata(path).is_ok() {
        assert!(
            Instant::now() < deadline,
            "{} still exists after {timeout:?}",
            path.display()
        );
        thread::sleep(Duration::from_millis(5));
    }
}

/// Sends a ping as `uid` and checks that it comes back from the echo daemon.
fn assert_served(router: &Router, uid: u32) {
    let mut conn = connect_as(&router.socket, uid);
    conn.write_all(PING).unwrap();
    assert_eq!(read_exactly(&mut conn, PING.len(), WAIT), PING);
}

// ---------------------------------------------------------------------------------------------
// Command line

#[test]
fn cli_version_prints_one_line_and_exits_0() {
    for flag in ["--version", "-version"] {
        let (status, stdout, stderr) = run_router(&[flag], WAIT);
        assert_eq!(status.code(), Some(0), "{flag}: {stderr}");
        let expected = format!(
            "docker-socket-router {} (commit ",
            env!("CARGO_PKG_VERSION")
        );
        assert!(stdout.starts_with(&expected), "{flag}: {stdout:?}");
        assert!(stdout.trim_end().ends_with(')'), "{stdout:?}");
        assert_eq!(stdout.trim_end().lines().count(), 1, "{stdout:?}");
    }
    let (status, stdout, _) = run_router(&["--help"], WAIT);
    assert_eq!(status.code(), Some(0));
    assert!(
        stdout.starts_with("Usage: docker-socket-router"),
        "{stdout:?}"
    );
}

#[test]
fn cli_invalid_values_exit_2_with_a_clear_message() {
    let dir = TempDir::new("cli");
    let socket = dir.join("router.sock");
    let socket_text = socket.display().to_string();
    let cases: &[(&[&str], &str)] = &[
        (&["--socket-mode", "999"], "--socket-mode"),
        (&["--socket-mode", "rw"], "--socket-mode"),
        (&["--max-connections", "0"], "--max-connections"),
        (&["--max-connections", "many"], "--max-connections"),
        (
            &[
                "--max-connections",
                "10",
                "--max-connections-per-user",
                "11",
            ],
            "--max-connections-per-user",
        ),
        (&["--buffer-size", "512"], "--buffer-size"),
        (&["--buffer-size", "1G"], "--buffer-size"),
        (&["--buffer-size", "lots"], "--buffer-size"),
        (&["--connect-timeout", "0s"], "--connect-timeout"),
        (&["--connect-timeout", "soon"], "--connect-timeout"),
        (&["--shutdown-timeout", "2d"], "--shutdown-timeout"),
        (&["--log-target", "file"], "--log-target"),
        (&["--user-socket", "/run/user/docker.sock"], "%d"),
        (&["--user-socket", "relative/%d.sock"], "absolute"),
        (&["--no-such-flag"], "--no-such-flag"),
        (&["stray"], "stray"),
        (&["--socket-mode"], "--socket-mode"),
    ];
    for (args, needle) in cases {
        let mut all = vec!["--socket", socket_text.as_str(), "--log-target", "stderr"];
        all.extend_from_slice(args);
        let (status, _, stderr) = run_router(&all, WAIT);
        assert_eq!(
            status.code(),
            Some(2),
            "{args:?} exited with {status}: {stderr}"
        );
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{args:?}: not one line: {stderr:?}");
        assert!(
            lines[0].contains(needle),
            "{args:?}: {needle} not in {stderr:?}"
        );
        assert!(!socket.exists(), "{args:?}: a socket was created");
    }
    let (status, _, stderr) = run_router(&["--socket", "", "--log-target", "stderr"], WAIT);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--socket"), "{stderr}");
}

// ---------------------------------------------------------------------------------------------
// The listening socket

#[test]
fn listener_socket_has_its_mode_from_the_start() {
    let dir = TempDir::new("mode");
    for (args, mode) in [(&[][..], 0o666), (&["--socket-mode", "0640"][..], 0o640)] {
        let path = dir.join("router.sock");
        // Watch the path while the router starts: it must never show another mode.
        let stop = Arc::new(AtomicBool::new(false));
        let watcher = {
            let (stop, path) = (stop.clone(), path.clone());
            thread::spawn(move || {
                let mut seen = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    if let Some(m) = socket_mode(&path)
                        && !seen.contains(&m)
                    {
                        seen.push(m);
                    }
                }
                seen
            })
        };
        let mut router = Router::start(&dir, args);
        thread::sleep(Duration::from_millis(50));
        stop.store(true, Ordering::SeqCst);
        let seen = watcher.join().unwrap();
        assert_eq!(
            seen,
            vec![mode],
            "{args:?}: modes seen {seen:?} (want {mode:o})"
        );
        assert_eq!(socket_mode(&path), Some(mode));
        assert_eq!(fs::metadata(&path).unwrap().uid(), own_uid());
        // Nothing is left behind under a temporary name.
        let names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.') || n.contains("tmp"))
            .collect();
        assert!(names.is_empty(), "left over: {names:?}");
        router.signal(Signal::SIGTERM);
        assert_eq!(router.wait_exit(WAIT).code(), Some(0));
    }
}

#[test]
fn listener_mode_decides_which_users_get_in() {
    if skip_without_root() {
        return;
    }
    let uid = 20301;
    let dir = TempDir::new("modeuser");
    let open = Router::start(&dir, &[]);
    // Mode 0666: another user reaches the router (and gets the router's answer).
    let mut conn = connect_as(&open.socket, uid);
    let (reply, _) = exchange(&mut conn, PING, WAIT);
    Reply::parse(&reply).assert_docker_error(502, false);
    drop(open);

    let closed = Router::start_with(
        &dir.join("private.sock"),
        &format!("{}/%d.sock", dir.subdir("up").display()),
        &["--socket-mode", "0600"],
    );
    let err = match connect_many_as(&closed.socket, uid, 1) {
        Ok(_) => panic!("uid {uid} connected to a 0600 socket of root"),
        Err(err) => err,
    };
    assert!(err.contains("Permission denied"), "{err}");
}

#[test]
fn listener_second_instance_exits_1_and_the_first_keeps_serving() {
    let uid = test_uid(20306);
    let dir = TempDir::new("second");
    let first = Router::start(&dir, &[]);
    let _server = Upstream::bind(&first.upstream_path(uid), uid).echo();
    let inode = fs::metadata(&first.socket).unwrap().ino();

    let socket = first.socket.display().to_string();
    let (status, _, stderr) = run_router(&["--socket", &socket, "--log-target", "stderr"], WAIT);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("another docker-socket-router already runs here"),
        "{stderr}"
    );
    assert_eq!(fs::metadata(&first.socket).unwrap().ino(), inode);
    assert_served(&first, uid);
}

#[test]
fn listener_stale_socket_is_replaced() {
    let uid = test_uid(20307);
    let dir = TempDir::new("stale");
    let socket = dir.join("router.sock");

    // A socket file nobody serves (a crashed process).
    drop(UnixListener::bind(&socket).unwrap());
    let router = Router::start(&dir, &[]);
    router.wait_log(&["removing stale socket"], WAIT);
    let _server = Upstream::bind(&router.upstream_path(uid), uid).echo();
    assert_served(&router, uid);

    // A router killed with SIGKILL leaves its socket behind; the next one takes over.
    let mut router = router;
    router.signal(Signal::SIGKILL);
    router.wait_exit(WAIT);
    assert!(
        socket_mode(&socket).is_some(),
        "SIGKILL cannot remove the socket"
    );
    let next = Router::start(&dir, &[]);
    next.wait_log(&["removing stale socket"], WAIT);
    assert_served(&next, uid);
}

#[test]
fn listener_never_removes_a_socket_another_process_serves() {
    let dir = TempDir::new("live");
    let socket = dir.join("router.sock");
    let socket_text = socket.display().to_string();
    let args = ["--socket", socket_text.as_str(), "--log-target", "stderr"];

    // A live process (this test, standing in for a rootful dockerd) serves the path.
    let live = UnixListener::bind(&socket).unwrap();
    let inode = fs::metadata(&socket).unwrap().ino();
    let (status, _, stderr) = run_router(&args, WAIT);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot start"), "{stderr}");
    assert!(
        stderr.contains("already served by a running process"),
        "{stderr}"
    );
    assert_eq!(
        fs::metadata(&socket).unwrap().ino(),
        inode,
        "the socket was replaced"
    );
    let _client = UnixStream::connect(&socket).expect("the live socket still works");
    live.set_nonblocking(true).unwrap();
    assert!(live.accept().is_ok());
    drop(live);
    fs::remove_file(&socket).unwrap();

    // Something that is not a socket is never touched.
    fs::write(&socket, b"precious").unwrap();
    let (status, _, stderr) = run_router(&args, WAIT);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("is not a socket"), "{stderr}");
    assert_eq!(fs::read(&socket).unwrap(), b"precious");

    // A directory that does not exist: exit 1 with a reason.
    let missing = dir.join("no/such/dir/router.sock").display().to_string();
    let (status, _, stderr) = run_router(&["--socket", &missing, "--log-target", "stderr"], WAIT);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot start"), "{stderr}");
}

#[test]
fn listener_never_removes_a_live_socket_with_a_full_backlog() {
    // A live process whose accept queue is full (a stuck dockerd) is alive too: the router must
    // say so and exit, not wait for it and not replace its socket.
    let dir = TempDir::new("busy");
    let socket = dir.join("router.sock");
    let socket_text = socket.display().to_string();
    let busy = Upstream::bind_with_backlog(&socket, own_uid(), 1);
    let _filler = busy.fill_backlog();
    let inode = fs::metadata(&socket).unwrap().ino();
    let mut router = Router::spawn(&["--socket", socket_text.as_str(), "--log-target", "stderr"]);
    let status = router.wait_exit_within(Duration::from_secs(5));
    let stderr = router.stderr.text();
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(1),
        "the router must exit 1 at once; it is still running after 5 s: {stderr}"
    );
    assert!(
        stderr.contains("already served by a running process"),
        "{stderr}"
    );
    assert_eq!(
        fs::metadata(&socket).unwrap().ino(),
        inode,
        "the socket was replaced"
    );
}

#[test]
fn listener_out_of_descriptors_pauses_without_spinning_and_recovers() {
    // With a tiny descriptor limit the router runs out of descriptors (EMFILE) while clients
    // keep coming. It must not exit, not spin, answer or queue every client, and serve again
    // once descriptors free up.
    let uid = test_uid(20310);
    const CLIENTS: usize = 24;
    let dir = TempDir::new("emfile");
    let mut router = Router::start_with_nofile(&dir, 20, &[]);
    let _server = Upstream::bind(&router.upstream_path(uid), uid).echo();

    let conns = connect_many_as(&router.socket, uid, CLIENTS).unwrap();
    thread::sleep(Duration::from_millis(300));
    let cpu_before = cpu_ticks(router.pid());
    thread::sleep(Duration::from_millis(700));
    let cpu_used = cpu_ticks(router.pid()) - cpu_before;
    assert!(router.is_running(), "{}", router.stderr.text());
    assert!(
        cpu_used <= 20,
        "the router spun: {cpu_used} ticks of CPU in 700 ms"
    );

    // Clients are served (or refused with an answer) in turn as earlier ones leave.
    let mut served = 0;
    for (i, mut conn) in conns.into_iter().enumerate() {
        conn.write_all(b"hello").unwrap();
        conn.shutdown(Shutdown::Write).unwrap();
        let answer = read_to_eof(&mut conn, WAIT);
        if answer == b"hello" {
            served += 1;
        } else {
            assert!(
                answer.starts_with(b"HTTP/1.1 5"),
                "client {i} got {:?}",
                String::from_utf8_lossy(&answer)
            );
        }
    }
    assert!(served > 0, "nobody was served");
    assert!(router.is_running());
    // Afterwards everything works again.
    assert_served(&router, uid);
    router.wait_conn_lines(CLIENTS + 1, WAIT);
}

// ---------------------------------------------------------------------------------------------
// Signals

#[test]
fn lifecycle_sigterm_lets_open_streams_finish() {
    let uid = test_uid(20303);
    let dir = TempDir::new("term");
    let mut router = Router::start(&dir, &["--shutdown-timeout", "10s"]);
    let _server = Upstream::bind(&router.upstream_path(uid), uid).echo();
    let mut first = connect_as(&router.socket, uid);
    let mut second = connect_as(&router.socket, uid);
    for conn in [&mut first, &mut second] {
        conn.write_all(b"before").unwrap();
        assert_eq!(read_exactly(conn, 6, WAIT), b"before");
    }

    router.signal(Signal::SIGTERM);
    router.wait_log(&["stopping: open connections: 2"], WAIT);
    // The socket goes at once: new clients find nothing to connect to.
    wait_gone(&router.socket, Duration::from_secs(2));
    let err = UnixStream::connect(&router.socket).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");

    // Open streams keep flowing both ways.
    let data = pattern(100_000, 9);
    first.write_all(&data).unwrap();
    assert!(read_exactly(&mut first, data.len(), WAIT) == data);
    first.shutdown(Shutdown::Write).unwrap();
    assert!(read_to_eof(&mut first, WAIT).is_empty());
    router.wait_log(&["outcome=completed"], WAIT);
    thread::sleep(Duration::from_millis(200));
    assert!(
        router.is_running(),
        "the router left before the second stream ended"
    );

    second.write_all(b"after").unwrap();
    assert_eq!(read_exactly(&mut second, 5, WAIT), b"after");
    second.shutdown(Shutdown::Write).unwrap();
    assert!(read_to_eof(&mut second, WAIT).is_empty());

    let status = router.wait_exit(WAIT);
    assert_eq!(status.code(), Some(0), "{}", router.stderr.text());
    let lines = router.conn_lines();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(
        lines.iter().all(|l| l.contains("outcome=completed")),
        "{lines:?}"
    );
    router.wait_log(&["stopped;", "counters ", "completed=2 "], WAIT);
}

#[test]
fn lifecycle_sigterm_grace_period_ends_the_rest() {
    let uid = test_uid(20304);
    let dir = TempDir::new("grace");
    let mut router = Router::start(&dir, &["--shutdown-timeout", "300ms"]);
    let _server = Upstream::bind(&router.upstream_path(uid), uid).echo();
    let mut held = connect_as(&router.socket, uid);
    held.write_all(b"x").unwrap();
    assert_eq!(read_exactly(&mut held, 1, WAIT), b"x");

    let start = Instant::now();
    router.signal(Signal::SIGTERM);
    let status = router.wait_exit(Duration::from_secs(5));
    let took = start.elapsed();
    assert_eq!(status.code(), Some(0));
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "grace period of 300 ms, exited after {took:?}"
    );
    let line = router.wait_conn_line(uid, WAIT);
    assert_eq!(field(&line, "outcome"), Some("aborted"), "{line}");
    // The client is not left hanging.
    let mut buf = [0u8; 8];
    held.set_read_timeout(Some(WAIT)).unwrap();
    match std::io::Read::read(&mut *held, &mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("expected end of stream after the router left, got {other:?}"),
    }
    assert!(!router.socket.exists());
}

#[test]
fn lifecycle_second_signal_exits_at_once() {
    let uid = test_uid(20305);
    let dir = TempDir::new("twice");
    let mut router = Router::start(&dir, &["--shutdown-timeout", "60s"]);
    let _server = Upstream::bind(&router.upstream_path(uid), uid).echo();
    let mut held = connect_as(&router.socket, uid);
    held.write_all(b"x").unwrap();
    assert_eq!(read_exactly(&mut held, 1, WAIT), b"x");

    router.signal(Signal::SIGTERM);
    router.wait_log(&["stopping: open connections: 1"], WAIT);
    thread::sleep(Duration::from_millis(100));
    assert!(router.is_running(), "the grace period is 60 s");
    let start = Instant::now();
    router.signal(Signal::SIGINT);
    let status = router.wait_exit(Duration::from_secs(3));
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "took {:?}",
        start.elapsed()
    );
    assert_eq!(status.code(), Some(0));
}

#[test]
fn lifecycle_sighup_is_ignored() {
    let uid = test_uid(20311);
    let dir = TempDir::new("hup");
    let mut router = Router::start(&dir, &[]);
    let _server = Upstream::bind(&router.upstream_path(uid), uid).echo();
    router.signal(Signal::SIGHUP);
    router.wait_log(&["SIGHUP"], WAIT);
    router.signal(Signal::SIGUSR2);
    router.wait_log(&["SIGUSR2 ignored"], WAIT);
    assert!(router.is_running());
    assert_served(&router, uid);
}

#[test]
fn lifecycle_counters_include_open_connections() {
    let uid = test_uid(20320);
    let dir = TempDir::new("usr1-live");
    let router = Router::start(&dir, &[]);
    let _server = Upstream::bind(&router.upstream_path(uid), uid).echo();
    let mut conn = connect_as(&router.socket, uid);
    conn.write_all(&[7u8; 3000]).unwrap();
    assert_eq!(read_exactly(&mut conn, 3000, WAIT).len(), 3000);
    router.signal(Signal::SIGUSR1);
    let line = router.wait_log(&["counters "], WAIT);
    assert!(line.contains("active=1"), "{line}");
    assert!(line.contains("bytes_to_daemon=3000"), "{line}");
    assert!(line.contains("bytes_from_daemon=3000"), "{line}");
}

#[test]
fn cli_user_socket_through_a_symlinked_dir_is_refused_at_start() {
    let dir = TempDir::new("tmpl-link");
    std::os::unix::fs::symlink(dir.path(), dir.join("alias")).unwrap();
    let socket = dir.join("docker.sock");
    let template = format!("{}/alias/%d.sock", dir.path().display());
    let (status, _, stderr) = run_router(
        &[
            "--socket",
            socket.to_str().unwrap(),
            "--user-socket",
            &template,
        ],
        WAIT,
    );
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("is a symbolic link"), "{stderr}");
    assert!(!socket.exists(), "nothing is bound");
}

#[test]
fn lifecycle_sigterm_leaves_a_socket_that_is_not_its_own() {
    let dir = TempDir::new("notown");
    let mut router = Router::start(&dir, &[]);
    // Someone else took the path over while the router ran.
    let other = dir.join("other.sock");
    let listener = UnixListener::bind(&other).unwrap();
    fs::rename(&other, &router.socket).unwrap();
    let inode = fs::metadata(&router.socket).unwrap().ino();

    router.signal(Signal::SIGTERM);
    assert_eq!(router.wait_exit(WAIT).code(), Some(0));
    assert_eq!(fs::metadata(&router.socket).unwrap().ino(), inode);
    let _client = UnixStream::connect(&router.socket).unwrap();
    listener.set_nonblocking(true).unwrap();
    assert!(listener.accept().is_ok());
}

// ---------------------------------------------------------------------------------------------
// Logging

/// Receives datagrams until one contains every needle.
fn recv_syslog(socket: &UnixDatagram, needles: &[&str]) -> String {
    let deadline = Instant::now() + WAIT;
    let mut seen = Vec::new();
    let mut buf = vec![0u8; 8192];
    while Instant::now() < deadline {
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        if let Ok(n) = socket.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            if needles.iter().all(|needle| text.contains(needle)) {
                return text;
            }
            seen.push(text);
        }
    }
    panic!("no syslog datagram with {needles:?}; got {seen:#?}");
}

/// A router logging to a syslog socket the test binds: the router, that socket and its path.
fn router_with_syslog(dir: &TempDir) -> (Router, UnixDatagram, std::path::PathBuf) {
    let log_path = dir.join("log.sock");
    let syslog = UnixDatagram::bind(&log_path).unwrap();
    let log_text = log_path.display().to_string();
    let args = ["--log-target", "syslog", "--syslog-socket", &log_text];
    (Router::start(dir, &args), syslog, log_path)
}

#[test]
fn logging_syslog_receives_the_connection_lines() {
    let uid = test_uid(20302);
    let dir = TempDir::new("syslog");
    let (router, syslog, _) = router_with_syslog(&dir);
    let tag = format!("docker-socket-router[{}]: ", router.pid());
    recv_syslog(&syslog, &[&tag, "listening on"]);

    // A served connection: facility daemon, level info (<30>).
    let _server = Upstream::bind(&router.upstream_path(uid), uid).echo();
    assert_served(&router, uid);
    let line = recv_syslog(
        &syslog,
        &[" conn=", &format!(" uid={uid} "), "outcome=completed"],
    );
    assert!(line.starts_with("<30>"), "{line}");
    assert!(line.contains(&tag), "{line}");

    // A refusal: level warning (<28>), with the reason.
    fs::remove_file(router.upstream_path(uid)).unwrap();
    let mut conn = connect_as(&router.socket, uid);
    exchange(&mut conn, PING, WAIT);
    let line = recv_syslog(&syslog, &["outcome=refused", "status=502"]);
    assert!(line.starts_with("<28>"), "{line}");

    // SIGUSR1 counters go there too; nothing went to stderr.
    router.signal(Signal::SIGUSR1);
    recv_syslog(&syslog, &["counters ", "accepted=2 "]);
    assert!(router.conn_lines().is_empty(), "{}", router.stderr.text());
}

#[test]
fn logging_without_syslog_falls_back_to_stderr() {
    let uid = test_uid(20308);
    let dir = TempDir::new("nosyslog");
    let missing = dir.join("no-log.sock").display().to_string();
    let router = Router::start(
        &dir,
        &["--log-target", "syslog", "--syslog-socket", &missing],
    );
    let _server = Upstream::bind(&router.upstream_path(uid), uid).echo();
    assert_served(&router, uid);
    router.wait_conn_line(uid, WAIT);
    let notes = router
        .stderr
        .lines()
        .into_iter()
        .filter(|l| l.contains("not available"))
        .count();
    assert_eq!(notes, 1, "say it once: {}", router.stderr.text());
    router.wait_log(&[&missing, "logging to stderr"], WAIT);
}

#[test]
fn logging_verbose_shows_state_changes() {
    let uid = test_uid(20312);
    let dir = TempDir::new("verbose");
    let router = Router::start(&dir, &["--verbose"]);
    let _server = Upstream::bind(&router.upstream_path(uid), uid).echo();
    assert_served(&router, uid);
    router.wait_conn_line(uid, WAIT);
    router.wait_log(&["DEBUG", "piping"], WAIT);

    // Without --verbose there are no debug lines.
    let quiet_dir = TempDir::new("quiet");
    let quiet = Router::start(&quiet_dir, &[]);
    let _quiet_server = Upstream::bind(&quiet.upstream_path(uid), uid).echo();
    assert_served(&quiet, uid);
    quiet.wait_conn_line(uid, WAIT);
    assert!(
        !quiet.stderr.text().contains("DEBUG"),
        "{}",
        quiet.stderr.text()
    );
}

#[test]
fn logging_syslog_that_goes_away_does_not_lose_lines() {
    let uid = test_uid(20309);
    let dir = TempDir::new("syslogdies");
    let (router, syslog, log_path) = router_with_syslog(&dir);
    recv_syslog(&syslog, &["listening on"]);
    // The syslog daemon stops (or restarts) while the router runs.
    drop(syslog);
    fs::remove_file(&log_path).unwrap();

    let _server = Upstream::bind(&router.upstream_path(uid), uid).echo();
    assert_served(&router, uid);
    // The line is not dropped silently: it reaches stderr, after one note that says why.
    router.wait_conn_line(uid, WAIT);
    let notes = router.stderr.lines().into_iter();
    let notes = notes
        .filter(|l| l.contains("syslog does not take lines"))
        .count();
    assert_eq!(notes, 1, "{}", router.stderr.text());
}

#[test]
fn logging_stderr_nobody_reads_never_stalls_the_router() {
    // stderr is a pipe that is never read (a paused terminal, a stuck log collector). Once it
    // is full, the router must keep serving and say how many lines it could not write.
    let dir = TempDir::new("stderr-stall");
    let socket = dir.join("docker.sock");
    let template = dir.join("%d.sock");
    let (unread, stderr_end) = nix::unistd::pipe().unwrap();
    /// Kills the router however the test ends, so a failing run leaves no process behind.
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let router_process = KillOnDrop(
        std::process::Command::new(BIN)
            .args(["--socket", socket.to_str().unwrap()])
            .args(["--user-socket", template.to_str().unwrap()])
            .args(["--log-target", "stderr", "--verbose"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::from(stderr_end))
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + WAIT;
    while socket_mode(&socket).is_none() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(5));
    }
    // Each refused connection logs several lines: a few hundred fill a 64 KiB pipe many times.
    let started = Instant::now();
    for i in 0..400 {
        let mut conn = UnixStream::connect(&socket).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        conn.write_all(b"GET /_ping HTTP/1.1\r\n\r\n").unwrap();
        let mut reply = Vec::new();
        let _ = std::io::Read::read_to_end(&mut conn, &mut reply);
        assert!(
            reply.starts_with(b"HTTP/1.1 502 "),
            "connection {i} got no answer after {:?}",
            started.elapsed()
        );
    }
    // Once stderr is read again, the router reports how many lines it could not write.
    let reader = thread::spawn(move || {
        let mut text = Vec::new();
        let mut pipe = fs::File::from(unread);
        let _ = std::io::Read::read_to_end(&mut pipe, &mut text);
        String::from_utf8_lossy(&text).into_owned()
    });
    thread::sleep(Duration::from_millis(100));
    let mut conn = UnixStream::connect(&socket).unwrap();
    conn.write_all(b"GET /_ping HTTP/1.1\r\n\r\n").unwrap();
    let _ = std::io::Read::read_to_end(&mut conn, &mut Vec::new());
    thread::sleep(Duration::from_millis(200));
    drop(router_process);
    let text = reader.join().unwrap();
    assert!(
        text.contains("log lines were dropped"),
        "no report of dropped lines"
    );
}
