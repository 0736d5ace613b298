//! Refusals and the Docker-style HTTP error replies that carry them.
//!
//! Contract: a [`Refusal`] says why a connection is not piped; [`Refusal::reply`] renders it as
//! the Docker daemon renders errors: a status line, `Content-Type: application/json`,
//! `Content-Length`, `Connection: close` and a `{"message": "..."}` body, which the docker CLI
//! prints as `Error response from daemon: <message>`. A reply to `HEAD` has the same headers and
//! no body. Messages name only the connecting user's own uid and socket path.

use std::fmt;
use std::time::Duration;

/// Why a route check found the user's socket unusable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forbidden {
    /// A component of the path is a symbolic link.
    Symlink,
    /// The path exists but is not a socket.
    NotSocket,
    /// The socket belongs to another user.
    WrongOwner,
    /// The path could not be opened for another reason (permissions, a non-directory component).
    Inaccessible,
}

impl Forbidden {
    fn as_str(self) -> &'static str {
        match self {
            Forbidden::Symlink => "symlink",
            Forbidden::NotSocket => "not-a-socket",
            Forbidden::WrongOwner => "wrong-owner",
            Forbidden::Inaccessible => "inaccessible",
        }
    }
}

/// Which connection limit was reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Global(usize),
    PerUser(usize),
}

/// Why a connection is refused. Every variant maps to one HTTP status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Nothing listens on the user's socket (`ENOENT`, `ECONNREFUSED`): 502.
    DaemonNotRunning { uid: u32, path: String },
    /// The daemon's accept backlog stayed full until the connect deadline: 504.
    ConnectTimeout {
        uid: u32,
        path: String,
        waited: Duration,
    },
    /// The user's socket failed a safety check: 403.
    Forbidden {
        uid: u32,
        path: String,
        why: Forbidden,
    },
    /// The router is at a connection limit: 503.
    LimitReached(Limit),
    /// Something failed inside the router: 500.
    Internal(String),
}

impl Refusal {
    pub fn status(&self) -> u16 {
        match self {
            Refusal::DaemonNotRunning { .. } => 502,
            Refusal::ConnectTimeout { .. } => 504,
            Refusal::Forbidden { .. } => 403,
            Refusal::LimitReached(_) => 503,
            Refusal::Internal(_) => 500,
        }
    }

    fn status_text(&self) -> &'static str {
        match self.status() {
            502 => "Bad Gateway",
            504 => "Gateway Timeout",
            403 => "Forbidden",
            503 => "Service Unavailable",
            _ => "Internal Server Error",
        }
    }

    /// A short machine-friendly reason for log lines.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::DaemonNotRunning { .. } => "daemon-not-running",
            Refusal::ConnectTimeout { .. } => "connect-timeout",
            Refusal::Forbidden { why, .. } => why.as_str(),
            Refusal::LimitReached(Limit::Global(_)) => "global-limit",
            Refusal::LimitReached(Limit::PerUser(_)) => "user-limit",
            Refusal::Internal(_) => "internal",
        }
    }

    /// The message the user reads after `Error response from daemon: `.
    pub fn message(&self) -> String {
        match self {
            Refusal::DaemonNotRunning { uid, path } => format!(
                "docker-socket-router: your Docker daemon is not running: nothing listens on \
                 {path} (uid {uid}). Start your rootless daemon, for example with \
                 `systemctl --user start docker`, or run `dockerd-rootless.sh`"
            ),
            Refusal::ConnectTimeout { uid, path, waited } => format!(
                "docker-socket-router: your Docker daemon at {path} (uid {uid}) is not accepting \
                 connections (waited {} ms); it may be overloaded or stuck",
                waited.as_millis()
            ),
            Refusal::Forbidden { uid, path, why } => {
                let detail = match why {
                    Forbidden::Symlink => {
                        "its path contains a symbolic link, which is never followed"
                    }
                    Forbidden::NotSocket => "it is not a socket",
                    Forbidden::WrongOwner => "it is not owned by you",
                    Forbidden::Inaccessible => "it cannot be opened",
                };
                format!(
                    "docker-socket-router: permission denied: {path} cannot be used for uid \
                     {uid}: {detail}"
                )
            }
            Refusal::LimitReached(Limit::Global(n)) => format!(
                "docker-socket-router: connection limit reached ({n} connections); try again"
            ),
            Refusal::LimitReached(Limit::PerUser(n)) => format!(
                "docker-socket-router: connection limit reached ({n} connections per user); \
                 try again"
            ),
            Refusal::Internal(reason) => format!("docker-socket-router: internal error: {reason}"),
        }
    }

    /// The whole HTTP reply; `head_only` leaves out the body (a reply to `HEAD`).
    pub fn reply(&self, head_only: bool) -> Vec<u8> {
        let body = format!("{{\"message\":\"{}\"}}\n", json_escape(&self.message()));
        let mut reply = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n",
            self.status(),
            self.status_text(),
            body.len()
        )
        .into_bytes();
        if !head_only {
            reply.extend_from_slice(body.as_bytes());
        }
        reply
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.status(), self.message())
    }
}

/// Escapes a string for a JSON string literal.
fn json_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for ch in text.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(reply: &[u8]) -> (String, String) {
        let text = String::from_utf8(reply.to_vec()).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        (head.to_string(), body.to_string())
    }

    #[test]
    fn test_reply_daemon_not_running_is_docker_style() {
        let refusal = Refusal::DaemonNotRunning {
            uid: 1000,
            path: "/run/user/1000/docker.sock".into(),
        };
        let (head, body) = split(&refusal.reply(false));
        assert!(head.starts_with("HTTP/1.1 502 Bad Gateway\r\n"));
        assert!(head.contains("Content-Type: application/json"));
        assert!(head.contains("Connection: close"));
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        assert!(body.starts_with("{\"message\":\"docker-socket-router: your Docker daemon"));
        assert!(body.contains("uid 1000") && body.contains("/run/user/1000/docker.sock"));
        assert!(body.contains("systemctl --user start docker"));
    }

    #[test]
    fn test_reply_to_head_has_headers_only() {
        let refusal = Refusal::LimitReached(Limit::PerUser(4));
        let full = refusal.reply(false);
        let head_only = refusal.reply(true);
        let (head, body) = split(&head_only);
        assert!(body.is_empty());
        assert!(head.starts_with("HTTP/1.1 503 "));
        assert!(full.starts_with(&head_only));
        assert!(full.len() > head_only.len());
    }

    #[test]
    fn test_reply_statuses() {
        let path = String::from("/p");
        let cases = [
            (
                Refusal::DaemonNotRunning {
                    uid: 1,
                    path: path.clone(),
                },
                502,
            ),
            (
                Refusal::ConnectTimeout {
                    uid: 1,
                    path: path.clone(),
                    waited: Duration::from_secs(1),
                },
                504,
            ),
            (
                Refusal::Forbidden {
                    uid: 1,
                    path,
                    why: Forbidden::WrongOwner,
                },
                403,
            ),
            (Refusal::LimitReached(Limit::Global(1)), 503),
            (Refusal::Internal("x".into()), 500),
        ];
        for (refusal, status) in cases {
            assert_eq!(refusal.status(), status);
            let reply = String::from_utf8(refusal.reply(false)).unwrap();
            assert!(reply.starts_with(&format!("HTTP/1.1 {status} ")), "{reply}");
        }
    }

    #[test]
    fn test_json_escape_quotes_controls() {
        assert_eq!(json_escape("a\"b\\c\n\u{1}"), "a\\\"b\\\\c\\n\\u0001");
    }
}
