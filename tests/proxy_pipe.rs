//! The byte pipe against real sockets: a fake daemon per uid, clients that are real processes
//! running as those uids, and the real router binary in between.
//!
//! Uids 20101..=20199 belong to this file (each test its own, so parallel tests never share one).

mod support;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use support::*;

#[test]
fn client_helper() {
    support::client_helper();
}

/// Waits until `counter` stops moving for `quiet`, at most `timeout`; returns its value.
fn wait_until_stalled(counter: &AtomicUsize, quiet: Duration, timeout: Duration) -> usize {
    let deadline = Instant::now() + timeout;
    let mut last = counter.load(Ordering::SeqCst);
    let mut since = Instant::now();
    while Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
        let now = counter.load(Ordering::SeqCst);
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= quiet {
            return now;
        }
    }
    panic!("the writer never stalled (at {last} bytes): no backpressure");
}

#[test]
fn pipe_echo_round_trip_logs_one_line() {
    let uid = test_uid(20101);
    let dir = TempDir::new("echo");
    let router = Router::start(&dir, &[]);
    let upstream_path = router.upstream_path(uid);
    let server = Upstream::bind(&upstream_path, uid).echo();

    let mut conn = connect_as(&router.socket, uid);
    // A ping, then every byte value, then noise: the router must not care what it carries.
    let mut payload = PING.to_vec();
    payload.extend((0..=255u8).cycle().take(4096));
    payload.extend(pattern(300_000, 1));
    conn.write_all(&payload).unwrap();
    let echoed = read_exactly(&mut conn, payload.len(), WAIT);
    assert!(echoed == payload, "the echo differs from what was sent");
    conn.shutdown(Shutdown::Write).unwrap();
    assert!(read_to_eof(&mut conn, WAIT).is_empty());

    let line = router.wait_conn_line(uid, WAIT);
    let uid_text = uid.to_string();
    let gid_text = conn.gid.to_string();
    let pid_text = conn.pid.to_string();
    let path_text = upstream_path.display().to_string();
    let len_text = payload.len().to_string();
    assert_eq!(field(&line, "uid"), Some(uid_text.as_str()), "{line}");
    assert_eq!(field(&line, "gid"), Some(gid_text.as_str()), "{line}");
    assert_eq!(field(&line, "pid"), Some(pid_text.as_str()), "{line}");
    assert_eq!(field(&line, "upstream"), Some(path_text.as_str()), "{line}");
    assert_eq!(field(&line, "outcome"), Some("completed"), "{line}");
    assert_eq!(field(&line, "bytes_to_daemon"), Some(len_text.as_str()));
    assert_eq!(field(&line, "bytes_from_daemon"), Some(len_text.as_str()));
    assert!(field(&line, "conn").is_some_and(|id| id.parse::<u64>().is_ok()));
    assert!(field(&line, "duration_ms").is_some_and(|ms| ms.parse::<u64>().is_ok()));
    assert!(
        line.contains("INFO"),
        "a completed connection logs at info: {line}"
    );
    assert_eq!(
        router.conn_lines().len(),
        1,
        "exactly one line per connection"
    );
    assert_eq!(server.accepted(), 1);
}

#[test]
fn pipe_users_reach_only_their_own_daemon() {
    if skip_without_root() {
        return;
    }
    let dir = TempDir::new("users");
    let router = Router::start(&dir, &[]);
    let uids = [20102, 20103];
    let _servers: Vec<Server> = uids
        .iter()
        .map(|&uid| {
            Upstream::bind(&router.upstream_path(uid), uid).serve(move |mut stream| {
                let _ = stream.write_all(format!("daemon of {uid}").as_bytes());
            })
        })
        .collect();
    for &uid in uids.iter().chain(uids.iter().rev()) {
        let mut conn = connect_as(&router.socket, uid);
        let answer = read_to_eof(&mut conn, WAIT);
        assert_eq!(String::from_utf8_lossy(&answer), format!("daemon of {uid}"));
    }
    router.wait_conn_lines(4, WAIT);
}

#[test]
fn pipe_client_half_close_keeps_the_reply_flowing() {
    let uid = test_uid(20104);
    let dir = TempDir::new("halfc");
    let router = Router::start(&dir, &[]);
    let upstream = Upstream::bind(&router.upstream_path(uid), uid);
    let request =
        b"POST /containers/x/attach?stdin=1 HTTP/1.1\r\nHost: docker\r\n\r\nstdin bytes".to_vec();
    let reply = pattern(256 * 1024, 2);

    let mut conn = connect_as(&router.socket, uid);
    let mut daemon = upstream.accept();
    conn.write_all(&request).unwrap();
    conn.shutdown(Shutdown::Write).unwrap();

    // The daemon sees the whole request, then end of stream (passed on as a half-close).
    let got = read_to_eof(&mut daemon, WAIT);
    assert_eq!(got, request);
    // The other direction still flows after the client's half-close, in pieces, with pauses.
    for chunk in reply.chunks(64 * 1024) {
        daemon.write_all(chunk).unwrap();
        thread::sleep(Duration::from_millis(30));
    }
    daemon.shutdown(Shutdown::Write).unwrap();
    let received = read_to_eof(&mut conn, WAIT);
    assert!(received == reply, "the reply after a half-close differs");
    drop(daemon);

    let line = router.wait_conn_line(uid, WAIT);
    assert_eq!(field(&line, "outcome"), Some("completed"), "{line}");
    assert_eq!(
        field(&line, "bytes_from_daemon"),
        Some(reply.len().to_string().as_str())
    );
}

#[test]
fn pipe_daemon_half_close_keeps_the_client_sending() {
    let uid = test_uid(20105);
    let dir = TempDir::new("halfd");
    let router = Router::start(&dir, &[]);
    let upstream = Upstream::bind(&router.upstream_path(uid), uid);
    let banner = pattern(100_000, 3);
    let upload = pattern(300_000, 4);

    let mut conn = connect_as(&router.socket, uid);
    let mut daemon = upstream.accept();
    daemon.write_all(&banner).unwrap();
    daemon.shutdown(Shutdown::Write).unwrap();

    // The client gets everything, then end of stream, while its own side stays open.
    let got = read_to_eof(&mut conn, WAIT);
    assert!(got == banner, "the banner differs");
    // Now the client sends (like stdin after a container's stdout closed).
    let mut writer = conn.try_clone().unwrap();
    let upload_copy = upload.clone();
    let sender = thread::spawn(move || {
        writer.write_all(&upload_copy).unwrap();
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let received = read_to_eof(&mut daemon, WAIT);
    sender.join().unwrap();
    assert!(
        received == upload,
        "the upload after the daemon's half-close differs"
    );
    drop(daemon);

    let line = router.wait_conn_line(uid, WAIT);
    assert_eq!(field(&line, "outcome"), Some("completed"), "{line}");
    assert_eq!(
        field(&line, "bytes_to_daemon"),
        Some(upload.len().to_string().as_str())
    );
    assert_eq!(
        field(&line, "bytes_from_daemon"),
        Some(banner.len().to_string().as_str())
    );
}

const BIG: usize = 8 << 20;

#[test]
fn pipe_backpressure_slow_client_holds_the_daemon_back() {
    let uid = test_uid(20106);
    let dir = TempDir::new("bpdown");
    let router = Router::start(&dir, &["--buffer-size", "4K"]);
    let upstream = Upstream::bind(&router.upstream_path(uid), uid);
    let baseline_kib = vm_hwm_kib(router.pid());

    let mut conn = connect_as(&router.socket, uid);
    let mut daemon = upstream.accept();
    let written = Arc::new(AtomicUsize::new(0));
    let counter = written.clone();
    let writer = thread::spawn(move || {
        for chunk in pattern(BIG, 5).chunks(16 * 1024) {
            daemon.write_all(chunk).unwrap();
            counter.fetch_add(chunk.len(), Ordering::SeqCst);
        }
        daemon.shutdown(Shutdown::Write).unwrap();
        // Hold the socket until the client is done.
        let _ = daemon.read(&mut [0u8; 1]);
    });

    // The client reads nothing: the daemon must be stopped by full buffers, not absorbed.
    let stalled = wait_until_stalled(&written, Duration::from_millis(300), WAIT);
    assert!(
        stalled < BIG / 4,
        "the daemon wrote {stalled} of {BIG} bytes to a client that reads nothing"
    );
    // Now read slowly at first, then everything; every byte arrives, in order.
    let mut received = Vec::with_capacity(BIG);
    for _ in 0..10 {
        received.extend(read_exactly(&mut conn, 1000, WAIT));
        thread::sleep(Duration::from_millis(10));
    }
    received.extend(read_exactly(
        &mut conn,
        BIG - received.len(),
        Duration::from_secs(30),
    ));
    assert!(received == pattern(BIG, 5), "the stream was corrupted");
    assert!(read_to_eof(&mut conn, WAIT).is_empty());
    conn.shutdown(Shutdown::Write).unwrap();
    writer.join().unwrap();

    let line = router.wait_conn_line(uid, WAIT);
    assert_eq!(field(&line, "outcome"), Some("completed"), "{line}");
    assert_eq!(
        field(&line, "bytes_from_daemon"),
        Some(BIG.to_string().as_str())
    );
    let grown_kib = vm_hwm_kib(router.pid()).saturating_sub(baseline_kib);
    assert!(
        grown_kib < 4096,
        "the router's memory grew by {grown_kib} KiB while moving {BIG} bytes through 4 KiB rings"
    );
}

#[test]
fn pipe_backpressure_slow_daemon_holds_the_client_back() {
    let uid = test_uid(20107);
    let dir = TempDir::new("bpup");
    let router = Router::start(&dir, &["--buffer-size", "4K"]);
    let upstream = Upstream::bind(&router.upstream_path(uid), uid);

    let conn = connect_as(&router.socket, uid);
    let mut daemon = upstream.accept();
    let written = Arc::new(AtomicUsize::new(0));
    let counter = written.clone();
    let mut client = conn.try_clone().unwrap();
    let writer = thread::spawn(move || {
        for chunk in pattern(BIG, 6).chunks(16 * 1024) {
            client.write_all(chunk).unwrap();
            counter.fetch_add(chunk.len(), Ordering::SeqCst);
        }
        client.shutdown(Shutdown::Write).unwrap();
    });

    let stalled = wait_until_stalled(&written, Duration::from_millis(300), WAIT);
    assert!(
        stalled < BIG / 4,
        "the client wrote {stalled} of {BIG} bytes to a daemon that reads nothing"
    );
    let received = read_to_eof(&mut daemon, Duration::from_secs(30));
    writer.join().unwrap();
    assert!(received == pattern(BIG, 6), "the upload was corrupted");
    drop(daemon);
    drop(conn);

    let line = router.wait_conn_line(uid, WAIT);
    assert_eq!(
        field(&line, "bytes_to_daemon"),
        Some(BIG.to_string().as_str()),
        "{line}"
    );
}

#[test]
fn pipe_idle_connections_hold_no_buffers() {
    // 40 piped connections with 1 MiB rings each way, idle after a short exchange (a
    // `docker events` waiting for hours): their rings must not stay allocated.
    let uid = test_uid(20111);
    const CONNS: usize = 40;
    let dir = TempDir::new("idle");
    let router = Router::start(&dir, &["--buffer-size", "1M"]);
    let _server = Upstream::bind(&router.upstream_path(uid), uid).echo();
    let before = proc_status_kib(router.pid(), "VmData");
    let mut conns = connect_many_as(&router.socket, uid, CONNS).unwrap();
    let request = b"GET /events HTTP/1.1\r\nHost: docker\r\n\r\n";
    for conn in conns.iter_mut() {
        conn.write_all(request).unwrap();
    }
    for conn in conns.iter_mut() {
        assert_eq!(read_exactly(conn, request.len(), WAIT), request);
    }
    thread::sleep(Duration::from_millis(200));
    let grown = proc_status_kib(router.pid(), "VmData").saturating_sub(before);
    assert!(
        grown < 16 * 1024,
        "{CONNS} idle connections hold {grown} KiB (rings of 1 MiB each way: {} KiB if kept)",
        CONNS * 2 * 1024
    );
    // They still work.
    for conn in conns.iter_mut() {
        conn.write_all(b"more").unwrap();
        assert_eq!(read_exactly(conn, 4, WAIT), b"more");
    }
}

#[test]
fn pipe_burst_larger_than_the_daemon_backlog_is_served() {
    let uid = test_uid(20108);
    const CLIENTS: usize = 40;
    let dir = TempDir::new("burst");
    let router = Router::start(&dir, &[]);
    // A daemon with a backlog of 2 that accepts nothing until every client has sent its request.
    let upstream = Upstream::bind_with_backlog(&router.upstream_path(uid), uid, 2);
    let mut conns = connect_many_as(&router.socket, uid, CLIENTS).unwrap();
    for (i, conn) in conns.iter_mut().enumerate() {
        conn.write_all(&pattern(64, i as u64 + 100)).unwrap();
        if i % 2 == 0 {
            // Half of them also close their sending side while the router is still connecting.
            conn.shutdown(Shutdown::Write).unwrap();
        }
    }
    thread::sleep(Duration::from_millis(400));
    // At most backlog + 1 connections fit in the queue: the router retries the rest.
    let server = upstream.serve(|mut stream| {
        let mut request = [0u8; 64];
        if stream.read_exact(&mut request).is_ok() {
            request.reverse();
            let _ = stream.write_all(&request);
        }
        let _ = stream.shutdown(Shutdown::Write);
        let _ = stream.read(&mut [0u8; 1]);
    });
    for (i, conn) in conns.iter_mut().enumerate() {
        let mut expected = pattern(64, i as u64 + 100);
        expected.reverse();
        let answer = read_exactly(conn, 64, WAIT);
        assert_eq!(answer, expected, "client {i} got a wrong answer");
        if i % 2 == 1 {
            conn.shutdown(Shutdown::Write).unwrap();
        }
        assert!(read_to_eof(conn, WAIT).is_empty());
    }
    drop(conns);

    let lines = router.wait_conn_lines(CLIENTS, WAIT);
    for line in &lines {
        assert_eq!(field(line, "outcome"), Some("completed"), "{line}");
    }
    let waited = lines
        .iter()
        .filter(|line| {
            field(line, "duration_ms").and_then(|ms| ms.parse::<u64>().ok()) >= Some(300)
        })
        .count();
    assert_eq!(
        waited, CLIENTS,
        "every connection waited for the busy daemon"
    );
    assert_eq!(server.accepted(), CLIENTS);

    // The counters agree (SIGUSR1).
    router.signal(Signal::SIGUSR1);
    let counters = router.wait_log(&["counters "], WAIT);
    for expected in [
        format!("accepted={CLIENTS} "),
        "active=0 ".to_string(),
        format!("completed={CLIENTS} "),
        "refused_502=0 ".to_string(),
        "refused_504=0 ".to_string(),
        format!("bytes_to_daemon={} ", CLIENTS * 64),
    ] {
        assert!(counters.contains(&expected), "{expected} not in {counters}");
    }
}

#[test]
fn pipe_garbage_and_idle_streams_pass_untouched() {
    // Not HTTP at all, and a pause longer than every deadline the router has (connect 300 ms,
    // request head 2 s, linger 1 s): a working connection is a byte pipe without deadlines.
    let uid = test_uid(20109);
    let dir = TempDir::new("opaque");
    let router = Router::start(&dir, &["--connect-timeout", "300ms"]);
    let _server = Upstream::bind(&router.upstream_path(uid), uid).echo();
    let mut conn = connect_as(&router.socket, uid);
    for (i, piece) in [&b"\x16\x03\x01\x02\x00\x01"[..], b"\0\0\0\0", b"\n\n\r\n"]
        .iter()
        .enumerate()
    {
        if i > 0 {
            thread::sleep(Duration::from_millis(if i == 1 { 2500 } else { 100 }));
        }
        conn.write_all(piece).unwrap();
        assert_eq!(&read_exactly(&mut conn, piece.len(), WAIT), piece);
    }
    conn.shutdown(Shutdown::Write).unwrap();
    read_to_eof(&mut conn, WAIT);
    let line = router.wait_conn_line(uid, WAIT);
    assert_eq!(field(&line, "outcome"), Some("completed"), "{line}");
}

#[test]
fn pipe_reset_by_the_daemon_is_passed_on() {
    let uid = test_uid(20110);
    let dir = TempDir::new("reset");
    let router = Router::start(&dir, &[]);
    let upstream = Upstream::bind(&router.upstream_path(uid), uid);
    let mut conn = connect_as(&router.socket, uid);
    let daemon = upstream.accept();
    conn.write_all(b"hello").unwrap();
    // The daemon dies with unread input: its side resets; the client must not hang.
    thread::sleep(Duration::from_millis(100));
    drop(daemon);
    let (tx, rx) = mpsc::channel();
    let mut reader: UnixStream = conn.try_clone().unwrap();
    thread::spawn(move || {
        let mut buf = [0u8; 16];
        let _ = tx.send(reader.read(&mut buf).map_err(|e| e.kind()));
    });
    let result = rx
        .recv_timeout(WAIT)
        .expect("the client hangs after the daemon died");
    assert!(
        matches!(result, Ok(0) | Err(_)),
        "expected end of stream or an error, got {result:?}"
    );
    let line = router.wait_conn_line(uid, WAIT);
    assert!(
        matches!(
            field(&line, "outcome"),
            Some("reset" | "error" | "completed")
        ),
        "{line}"
    );
}

#[test]
fn pipe_client_that_vanishes_after_its_eof_is_noticed_while_the_daemon_is_silent() {
    // An attach whose client sent stdin EOF and then died: the daemon keeps the stream open
    // and says nothing. The router must notice the client is gone and end the connection,
    // instead of holding both sockets until the daemon next writes.
    let uid = test_uid(20120);
    let dir = TempDir::new("vanish");
    let router = Router::start(&dir, &[]);
    let _server = Upstream::bind(&router.upstream_path(uid), uid).serve(|mut stream| {
        let mut stdin = Vec::new();
        let _ = stream.read_to_end(&mut stdin);
        thread::sleep(Duration::from_secs(15)); // silent, the stream held open
        drop(stream);
    });
    let mut conn = connect_as(&router.socket, uid);
    conn.write_all(b"stdin").unwrap();
    conn.shutdown(Shutdown::Write).unwrap();
    thread::sleep(Duration::from_millis(200));
    let gone = Instant::now();
    drop(conn);
    let line = router.wait_conn_line(uid, Duration::from_secs(5));
    assert!(
        gone.elapsed() < QUICK,
        "noticed only after {:?}",
        gone.elapsed()
    );
    assert_eq!(field(&line, "bytes_to_daemon"), Some("5"), "{line}");
    assert_eq!(field(&line, "outcome"), Some("completed"), "{line}");
}
