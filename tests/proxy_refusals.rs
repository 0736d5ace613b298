//! Refusals against real sockets: every way a connection is not piped ends in a Docker-style HTTP
//! error the client reads (or a quick close), never a hang, and never a connection to a socket
//! that is not the user's own.
//!
//! Uids 20201..=20299 belong to this file (each test its own, so parallel tests never share one).

mod support;

use std::fs;
use std::io::{ErrorKind, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use support::*;

#[test]
fn client_helper() {
    support::client_helper();
}

/// Connects as `uid`, sends `request` and reads the reply to the end.
fn ask(router: &Router, uid: u32, request: &[u8]) -> (Reply, Duration) {
    let mut conn = connect_as(&router.socket, uid);
    let (bytes, took) = exchange(&mut conn, request, WAIT);
    (Reply::parse(&bytes), took)
}

/// Asserts the latest refusal line of `uid` has this status and reason; returns it.
fn refusal_line(router: &Router, uid: u32, nth: usize, status: u16, reason: &str) -> String {
    let needle = format!(" uid={uid} ");
    let lines = router
        .stderr
        .find_all(nth, WAIT, |l| is_conn_line(l) && l.contains(&needle))
        .unwrap_or_else(|| panic!("no connection line {nth} for uid {uid}"));
    let line = lines.last().cloned().unwrap_or_default();
    let status_text = status.to_string();
    assert_eq!(field(&line, "outcome"), Some("refused"), "{line}");
    assert_eq!(field(&line, "status"), Some(status_text.as_str()), "{line}");
    assert_eq!(field(&line, "reason"), Some(reason), "{line}");
    assert!(field(&line, "message").is_some(), "{line}");
    line
}

/// Puts a socket owned by `owner` at `path` that nobody serves any more (connect is refused).
fn stale_socket(path: &Path, owner: u32) {
    drop(UnixListener::bind(path).unwrap());
    chown(path, owner);
}

#[test]
fn refuse_502_daemon_not_running_then_serve_once_it_runs() {
    let uid = test_uid(20201);
    let dir = TempDir::new("r502");
    let router = Router::start(&dir, &[]);
    let path = router.upstream_path(uid);
    let path_text = path.display().to_string();

    // No socket at all.
    let (reply, took) = ask(&router, uid, PING);
    reply.assert_docker_error(502, false);
    assert_eq!(reply.status_line, "HTTP/1.1 502 Bad Gateway");
    let body = reply.body_text();
    assert!(body.contains(&format!("uid {uid}")), "{body}");
    assert!(body.contains(&path_text), "{body}");
    assert!(body.contains("systemctl --user start docker"), "{body}");
    assert!(
        took < QUICK,
        "a complete head is answered at once, took {took:?}"
    );
    let line = refusal_line(&router, uid, 1, 502, "daemon-not-running");
    assert!(line.contains("WARN"), "a refusal is a warning: {line}");
    assert!(
        field(&line, "message").unwrap().contains(&path_text),
        "{line}"
    );

    // A socket file nobody serves (a stopped daemon): connect is refused, same answer.
    stale_socket(&path, uid);
    let (reply, _) = ask(&router, uid, PING);
    reply.assert_docker_error(502, false);
    refusal_line(&router, uid, 2, 502, "daemon-not-running");

    // The user starts the daemon: the very next connection is served (nothing cached).
    fs::remove_file(&path).unwrap();
    let _server = Upstream::bind(&path, uid).echo();
    let mut conn = connect_as(&router.socket, uid);
    conn.write_all(PING).unwrap();
    assert_eq!(read_exactly(&mut conn, PING.len(), WAIT), PING);
}

#[test]
fn refuse_403_symlinked_socket_or_directory() {
    let uid = test_uid(20202);
    let dir = TempDir::new("r403sym");
    let router = Router::start(&dir, &[]);
    let real_dir = dir.subdir("real");
    let real = Upstream::bind(&real_dir.join("docker.sock"), uid);

    // The user's socket path is a symlink to a socket the user owns: still refused.
    std::os::unix::fs::symlink(&real.path, router.upstream_path(uid)).unwrap();
    let (reply, _) = ask(&router, uid, PING);
    reply.assert_docker_error(403, false);
    assert_eq!(reply.status_line, "HTTP/1.1 403 Forbidden");
    assert!(
        reply.body_text().contains("symbolic link"),
        "{}",
        reply.body_text()
    );
    refusal_line(&router, uid, 1, 403, "symlink");
    real.assert_no_connection();

    // A symlink in a directory component of the path is refused too.
    let users = dir.subdir("users");
    std::os::unix::fs::symlink(&real_dir, users.join(uid.to_string())).unwrap();
    let template = format!("{}/%d/docker.sock", users.display());
    let router2 = Router::start_with(&dir.join("router2.sock"), &template, &[]);
    let (reply, _) = ask(&router2, uid, PING);
    reply.assert_docker_error(403, false);
    refusal_line(&router2, uid, 1, 403, "symlink");
    real.assert_no_connection();
}

#[test]
fn refuse_403_socket_of_another_owner() {
    if skip_without_root() {
        return;
    }
    let (uid, other) = (20203, 20204);
    let dir = TempDir::new("r403own");
    let router = Router::start(&dir, &[]);
    let path = router.upstream_path(uid);

    for owner in [0, other] {
        let upstream = Upstream::bind(&path, owner);
        let (reply, _) = ask(&router, uid, PING);
        reply.assert_docker_error(403, false);
        let body = reply.body_text();
        assert!(body.contains("not owned by you"), "{body}");
        assert!(
            !body.contains(&other.to_string()),
            "leaks the other uid: {body}"
        );
        upstream.assert_no_connection();
        drop(upstream);
        fs::remove_file(&path).unwrap();
    }
    refusal_line(&router, uid, 2, 403, "wrong-owner");
}

#[test]
fn refuse_403_not_a_socket() {
    let uid = test_uid(20205);
    let dir = TempDir::new("r403file");
    let router = Router::start(&dir, &[]);
    let path = router.upstream_path(uid);

    fs::write(&path, b"not a socket").unwrap();
    chown(&path, uid);
    let (reply, _) = ask(&router, uid, PING);
    reply.assert_docker_error(403, false);
    assert!(
        reply.body_text().contains("not a socket"),
        "{}",
        reply.body_text()
    );
    refusal_line(&router, uid, 1, 403, "not-a-socket");

    fs::remove_file(&path).unwrap();
    fs::create_dir(&path).unwrap();
    chown(&path, uid);
    let (reply, _) = ask(&router, uid, PING);
    reply.assert_docker_error(403, false);
    refusal_line(&router, uid, 2, 403, "not-a-socket");
}

#[test]
fn refuse_403_own_socket_swapped_for_another_users() {
    if skip_without_root() {
        return;
    }
    let (uid, victim) = (20206, 20207);
    let dir = TempDir::new("r403swap");
    let router = Router::start(&dir, &[]);
    let own_path = router.upstream_path(uid);
    let victim_path = router.upstream_path(victim);
    let victim_daemon = Upstream::bind(&victim_path, victim);

    // At first the user is served by their own daemon.
    let own = Upstream::bind(&own_path, uid);
    let mut conn = connect_as(&router.socket, uid);
    let mut daemon = own.accept();
    conn.write_all(b"ping").unwrap();
    assert_eq!(read_exactly(&mut daemon, 4, WAIT), b"ping");
    drop((conn, daemon));
    router.wait_conn_line(uid, WAIT);

    // The user replaces their socket with a symlink to the victim's live socket.
    fs::rename(&own_path, dir.join("moved.sock")).unwrap();
    std::os::unix::fs::symlink(&victim_path, &own_path).unwrap();
    let (reply, _) = ask(&router, uid, PING);
    reply.assert_docker_error(403, false);
    assert!(
        !reply.body_text().contains(&victim.to_string()),
        "{reply:?}"
    );
    refusal_line(&router, uid, 2, 403, "symlink");
    victim_daemon.assert_no_connection();

    // A hard link to the victim's socket is no better: it is owned by the victim.
    fs::remove_file(&own_path).unwrap();
    fs::hard_link(&victim_path, &own_path).unwrap();
    let (reply, _) = ask(&router, uid, PING);
    reply.assert_docker_error(403, false);
    refusal_line(&router, uid, 3, 403, "wrong-owner");
    victim_daemon.assert_no_connection();

    // The victim's daemon was live all along: the victim gets through.
    let _victim_conn = connect_as(&router.socket, victim);
    assert!(victim_daemon.try_accept(WAIT).is_some());
}

#[test]
fn refuse_garbage_is_answered_quickly() {
    let uid = test_uid(20208);
    let dir = TempDir::new("rgarbage");
    let router = Router::start(&dir, &[]);
    let huge_line = [b"GET /".as_slice(), &[b'a'; 20_000]].concat();
    let inputs: [&[u8]; 4] = [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", // a TLS client hello
        b"\0\0\0\0\0\0\0\0",
        b"SSH-2.0-OpenSSH_9.6\r\n",
        &huge_line, // a head that never ends within the router's bound
    ];
    for (i, input) in inputs.iter().enumerate() {
        let mut conn = connect_as(&router.socket, uid);
        let (bytes, took) = exchange(&mut conn, input, WAIT);
        // The head timeout is 2 s: a quick answer proves the bytes themselves decided it.
        assert!(took < QUICK, "input {i}: took {took:?}");
        if !bytes.is_empty() {
            Reply::parse(&bytes).assert_docker_error(502, false);
        }
    }
    router.wait_conn_lines(inputs.len(), WAIT);
}

#[test]
fn refuse_silent_client_gets_the_answer_and_is_closed() {
    let uid = test_uid(20209);
    let dir = TempDir::new("rsilent");
    let router = Router::start(&dir, &[]);
    let mut conn = connect_as(&router.socket, uid);
    let start = Instant::now();
    // The client sends nothing and never closes.
    let bytes = read_to_eof(&mut conn, Duration::from_secs(8));
    let took = start.elapsed();
    Reply::parse(&bytes).assert_docker_error(502, false);
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(5),
        "a silent client is answered after a short wait, took {took:?}"
    );
    // The router closes its side within a few seconds although the client stays silent.
    let line = refusal_line(&router, uid, 1, 502, "daemon-not-running");
    let ms: u64 = field(&line, "duration_ms").unwrap().parse().unwrap();
    assert!(ms < 6000, "closed after {ms} ms");
    assert!(start.elapsed() < Duration::from_secs(8));
}

#[test]
fn refuse_head_request_gets_headers_without_a_body() {
    let uid = test_uid(20210);
    let dir = TempDir::new("rhead");
    let router = Router::start(&dir, &[]);
    let (head, took) = ask(
        &router,
        uid,
        b"HEAD /_ping HTTP/1.1\r\nHost: docker\r\n\r\n",
    );
    head.assert_docker_error(502, true);
    assert!(took < QUICK, "took {took:?}");
    // The CLI then retries with GET to read the message: same headers, now with the body.
    let (get, _) = ask(&router, uid, PING);
    get.assert_docker_error(502, false);
    assert_eq!(head.header("Content-Length"), get.header("Content-Length"));
}

#[test]
fn refuse_http10_and_bare_newline_requests_are_answered_at_once() {
    let uid = test_uid(20211);
    let dir = TempDir::new("rlenient");
    let router = Router::start(&dir, &[]);
    let requests: [&[u8]; 4] = [
        b"GET /_ping HTTP/1.0\r\n\r\n",
        b"GET /_ping HTTP/1.0\n\n",
        b"GET /version HTTP/1.1\nHost: docker\nAccept: */*\n\n",
        b"\r\nGET /_ping HTTP/1.1\r\nHost: docker\r\n\r\n",
    ];
    for request in requests {
        let (reply, took) = ask(&router, uid, request);
        reply.assert_docker_error(502, false);
        assert!(
            took < QUICK,
            "{:?} took {took:?}",
            String::from_utf8_lossy(request)
        );
    }
}

#[test]
fn refuse_client_that_half_closes_gets_the_reply() {
    let uid = test_uid(20212);
    let dir = TempDir::new("rhalf");
    let router = Router::start(&dir, &[]);
    for (request, must_reply) in [
        (PING, true),
        (&b"GET /_pi"[..], true), // an unfinished head, then end of stream
        (&b""[..], false),        // nothing at all: a reply or a close
    ] {
        let mut conn = connect_as(&router.socket, uid);
        conn.write_all(request).unwrap();
        conn.shutdown(Shutdown::Write).unwrap();
        let start = Instant::now();
        let bytes = read_to_eof(&mut conn, WAIT);
        let took = start.elapsed();
        assert!(took < QUICK, "{request:?}: took {took:?}");
        if must_reply || !bytes.is_empty() {
            Reply::parse(&bytes).assert_docker_error(502, false);
        }
    }
    router.wait_conn_lines(3, WAIT);
}

#[test]
fn refuse_upload_gets_the_reply_right_after_the_head() {
    let uid = test_uid(20213);
    let dir = TempDir::new("rupload");
    let router = Router::start(&dir, &[]);
    let head = b"POST /images/load HTTP/1.1\r\nHost: docker\r\nContent-Type: application/x-tar\r\n\
                 Content-Length: 1073741824\r\nExpect: 100-continue\r\n\r\n";

    // Expect: 100-continue: the client waits for the server before sending the body.
    let (reply, took) = ask(&router, uid, head);
    reply.assert_docker_error(502, false);
    assert!(took < QUICK, "took {took:?}");

    // A client that sends the body at once, and keeps sending: the reply still comes right after
    // the head, and the router closes the connection within a few seconds.
    let mut conn = connect_as(&router.socket, uid);
    let mut writer = conn.try_clone().unwrap();
    writer.write_all(head).unwrap();
    let sent = Instant::now();
    let pump = thread::spawn(move || {
        let chunk = vec![b'x'; 64 * 1024];
        let start = Instant::now();
        loop {
            if let Err(err) = writer.write_all(&chunk) {
                return (err.kind(), start.elapsed());
            }
            if start.elapsed() > Duration::from_secs(15) {
                return (ErrorKind::TimedOut, start.elapsed());
            }
        }
    });
    let bytes = read_to_eof(&mut conn, WAIT);
    let took = sent.elapsed();
    Reply::parse(&bytes).assert_docker_error(502, false);
    assert!(took < QUICK, "the reply waited for the body: {took:?}");
    let (kind, pumped) = pump.join().unwrap();
    assert!(
        matches!(kind, ErrorKind::BrokenPipe | ErrorKind::ConnectionReset),
        "the upload ended with {kind:?} after {pumped:?}"
    );
    assert!(
        pumped < Duration::from_secs(6),
        "closed only after {pumped:?}"
    );
    refusal_line(&router, uid, 2, 502, "daemon-not-running");
}

#[test]
fn refuse_503_at_the_per_user_limit() {
    let uid = test_uid(20214);
    let other = 20215;
    let dir = TempDir::new("r503");
    let router = Router::start(&dir, &["--max-connections-per-user", "1"]);
    let _server = Upstream::bind(&router.upstream_path(uid), uid).echo();
    let _other_server =
        is_root().then(|| Upstream::bind(&router.upstream_path(other), other).echo());

    // One connection is open and piped.
    let mut held = connect_as(&router.socket, uid);
    held.write_all(b"hold").unwrap();
    assert_eq!(read_exactly(&mut held, 4, WAIT), b"hold");

    // The same user's second one is refused politely.
    let (reply, took) = ask(&router, uid, PING);
    reply.assert_docker_error(503, false);
    assert_eq!(reply.status_line, "HTTP/1.1 503 Service Unavailable");
    let body = reply.body_text();
    assert!(
        body.contains("limit reached (1 connections per user)"),
        "{body}"
    );
    assert!(took < QUICK);
    refusal_line(&router, uid, 1, 503, "user-limit");

    // Another user is not affected.
    if is_root() {
        let mut conn = connect_as(&router.socket, other);
        conn.write_all(b"other").unwrap();
        assert_eq!(read_exactly(&mut conn, 5, WAIT), b"other");
    }

    // Once the first one ends, the user is served again.
    held.shutdown(Shutdown::Write).unwrap();
    read_to_eof(&mut held, WAIT);
    router.wait_log(&[&format!(" uid={uid} "), "outcome=completed"], WAIT);
    let mut again = connect_as(&router.socket, uid);
    again.write_all(b"again").unwrap();
    assert_eq!(read_exactly(&mut again, 5, WAIT), b"again");
}

#[test]
fn refuse_503_at_the_global_limit() {
    let uid = test_uid(20216);
    let second = test_uid(20217);
    let dir = TempDir::new("r503all");
    let router = Router::start(
        &dir,
        &["--max-connections", "1", "--max-connections-per-user", "1"],
    );
    let _server = Upstream::bind(&router.upstream_path(uid), uid).echo();
    let mut held = connect_as(&router.socket, uid);
    held.write_all(b"hold").unwrap();
    assert_eq!(read_exactly(&mut held, 4, WAIT), b"hold");

    let (reply, _) = ask(&router, second, PING);
    reply.assert_docker_error(503, false);
    assert!(
        reply.body_text().contains("limit reached (1 connections)"),
        "{}",
        reply.body_text()
    );
    router.wait_log(&[&format!(" uid={second} "), "reason=global-limit"], WAIT);
}

#[test]
fn refuse_503_flood_beyond_the_limit_is_answered_in_turn() {
    // One connection is piped (the limit), and a flood of 40 more arrives at once: more than the
    // slots the router keeps for answering 503s. Every one gets its 503 (or waits in the
    // listen queue until a slot frees): none hangs, none is reset without an answer.
    let uid = test_uid(20219);
    const FLOOD: usize = 40;
    let dir = TempDir::new("r503flood");
    let router = Router::start(
        &dir,
        &["--max-connections", "1", "--max-connections-per-user", "1"],
    );
    let _server = Upstream::bind(&router.upstream_path(uid), uid).echo();
    let mut held = connect_as(&router.socket, uid);
    held.write_all(b"hold").unwrap();
    assert_eq!(read_exactly(&mut held, 4, WAIT), b"hold");

    let conns = connect_many_as(&router.socket, uid, FLOOD).unwrap();
    let start = Instant::now();
    for (i, mut conn) in conns.into_iter().enumerate() {
        // Far over the user's share, the router answers before the request arrives and
        // closes: the write may then fail, but the answer is there to read.
        let _ = conn.write_all(PING);
        let bytes = read_to_eof(&mut conn, WAIT);
        assert!(!bytes.is_empty(), "client {i} got no answer");
        Reply::parse(&bytes).assert_docker_error(503, false);
    }
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );
    let lines = router.wait_conn_lines(FLOOD, WAIT);
    assert!(
        lines
            .iter()
            .all(|l| l.contains("reason=global-limit") || l.contains("reason=user-limit")),
        "{lines:#?}"
    );

    // The piped connection was not disturbed.
    held.write_all(b"still").unwrap();
    assert_eq!(read_exactly(&mut held, 5, WAIT), b"still");
}

#[test]
fn refuse_504_when_the_daemon_backlog_stays_full() {
    let uid = test_uid(20218);
    let dir = TempDir::new("r504");
    let router = Router::start(&dir, &["--connect-timeout", "300ms"]);
    // A daemon that never accepts, with a backlog of 1, filled up.
    let upstream = Upstream::bind_with_backlog(&router.upstream_path(uid), uid, 1);
    let filler = upstream.fill_backlog();
    assert!(!filler.is_empty());

    let cpu_before = cpu_ticks(router.pid());
    let (reply, took) = ask(&router, uid, PING);
    let cpu_used = cpu_ticks(router.pid()) - cpu_before;
    reply.assert_docker_error(504, false);
    assert_eq!(reply.status_line, "HTTP/1.1 504 Gateway Timeout");
    assert!(
        reply.body_text().contains("not accepting connections"),
        "{}",
        reply.body_text()
    );
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "the connect deadline is 300 ms, the answer took {took:?}"
    );
    // Retrying a full backlog backs off instead of spinning (10 ms clock ticks).
    assert!(
        cpu_used <= 10,
        "the router used {cpu_used} ticks of CPU while waiting"
    );
    refusal_line(&router, uid, 1, 504, "connect-timeout");

    // The daemon catches up: the next connection is served.
    drop(filler);
    let _server = upstream.echo();
    let mut conn = connect_as(&router.socket, uid);
    conn.write_all(b"back").unwrap();
    assert_eq!(read_exactly(&mut conn, 4, WAIT), b"back");
}

#[test]
fn refuse_a_flood_of_silent_clients_cannot_delay_another_user() {
    // One user (no daemon) opens far more silent connections than the router has slots. Each
    // refusal waits up to 2 s for a request head, so without a per-user cap on refusals the
    // flood would fill every slot and another user would wait in the listen queue.
    if skip_without_root() {
        return;
    }
    let flooder = 20231;
    let victim = 20232;
    const FLOOD: usize = 80;
    let dir = TempDir::new("rflood-silent");
    let router = Router::start(
        &dir,
        &["--max-connections", "16", "--max-connections-per-user", "4"],
    );
    let _server = Upstream::bind(&router.upstream_path(victim), victim).echo();

    let silent = connect_many_as(&router.socket, flooder, FLOOD).unwrap();
    thread::sleep(Duration::from_millis(200));

    let started = Instant::now();
    let mut conn = connect_as(&router.socket, victim);
    conn.write_all(b"still served").unwrap();
    assert_eq!(read_exactly(&mut conn, 12, WAIT), b"still served");
    let took = started.elapsed();
    assert!(
        took < QUICK,
        "another user waited {took:?} behind the flood"
    );

    // The flooder's connections beyond its share were answered at once, not held.
    let answered_quickly = silent
        .into_iter()
        .filter_map(|mut conn| {
            conn.set_read_timeout(Some(Duration::from_millis(300))).ok();
            let mut buf = Vec::new();
            let _ = std::io::Read::read_to_end(&mut conn.stream, &mut buf);
            (!buf.is_empty()).then(|| Reply::parse(&buf))
        })
        .filter(|reply| reply.status_line.starts_with("HTTP/1.1 503 "))
        .count();
    assert!(
        answered_quickly >= FLOOD - 16,
        "only {answered_quickly} of {FLOOD} got a 503"
    );
}
