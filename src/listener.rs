//! The listening socket and its lock.
//!
//! Contract:
//! - An exclusive, non-blocking `flock` on `<socket>.lock` is taken first and held for the life
//!   of the process, so two routers never fight over one path; the second one fails at start.
//! - An existing socket path is replaced only if nobody serves it (connect is refused): a stale
//!   socket of a killed router goes, a live dockerd's socket is never touched; a path that is
//!   not a socket is never touched either.
//! - The socket is bound under a temporary name in the same directory, given its final mode,
//!   and renamed into place, so it never appears with other permissions.
//! - On shutdown the socket is removed only if the path still names the inode we bound.

use std::ffi::OsString;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, UnixAddr, bind, listen, socket,
};

/// Why the listener could not be set up. Each message is one line for the operator.
#[derive(Debug)]
pub enum ListenError {
    /// Another router holds the lock.
    Locked { lock: PathBuf },
    /// A live process (not a router of ours) serves the socket path.
    InUse { socket: PathBuf },
    /// The path exists and is not a socket.
    NotASocket { socket: PathBuf },
    /// A system call failed.
    Io { what: String, err: io::Error },
}

impl fmt::Display for ListenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenError::Locked { lock } => write!(
                f,
                "another docker-socket-router already runs here (it holds the lock {}); \
                 not starting a second one",
                lock.display()
            ),
            ListenError::InUse { socket } => write!(
                f,
                "{} is already served by a running process (a rootful dockerd?); not replacing \
                 it. Stop that service (e.g. `systemctl disable --now docker.socket docker`) or \
                 choose another path with --socket",
                socket.display()
            ),
            ListenError::NotASocket { socket } => write!(
                f,
                "{} exists and is not a socket; not replacing it",
                socket.display()
            ),
            ListenError::Io { what, err } => write!(f, "{what}: {err}"),
        }
    }
}

fn io_error(what: impl Into<String>) -> impl FnOnce(io::Error) -> ListenError {
    let what = what.into();
    move |err| ListenError::Io { what, err }
}

/// The bound, listening socket plus what is needed to clean it up.
pub struct Listener {
    pub socket: mio::net::UnixListener,
    path: PathBuf,
    inode: (u64, u64),
    _lock: Flock<File>,
}

impl Listener {
    /// Takes the lock, clears a stale socket and binds `path` with `mode`.
    pub fn bind(path: &Path, mode: u32, backlog: i32) -> Result<Listener, ListenError> {
        let lock = take_lock(path)?;
        clear_stale(path)?;
        let socket = bind_in_place(path, mode, backlog)?;
        let meta =
            fs::symlink_metadata(path).map_err(io_error(format!("stat {}", path.display())))?;
        Ok(Listener {
            socket,
            path: path.to_path_buf(),
            inode: (meta.dev(), meta.ino()),
            _lock: lock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the socket file if it is still ours. Returns whether it was removed.
    pub fn remove_socket_file(&self) -> bool {
        match fs::symlink_metadata(&self.path) {
            Ok(meta) if (meta.dev(), meta.ino()) == self.inode => {
                fs::remove_file(&self.path).is_ok()
            }
            _ => false,
        }
    }
}

/// The lock file that guards a socket path.
pub fn lock_path(socket: &Path) -> PathBuf {
    let mut name = OsString::from(socket.as_os_str());
    name.push(".lock");
    PathBuf::from(name)
}

fn take_lock(socket: &Path) -> Result<Flock<File>, ListenError> {
    let lock = lock_path(socket);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(nix::libc::O_CLOEXEC | nix::libc::O_NOFOLLOW)
        .open(&lock)
        .map_err(io_error(format!("open lock file {}", lock.display())))?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        if errno == nix::errno::Errno::EWOULDBLOCK {
            ListenError::Locked { lock }
        } else {
            ListenError::Io {
                what: format!("lock {}", lock.display()),
                err: errno.into(),
            }
        }
    })
}

/// Removes a socket nobody serves; refuses to touch a live one or a non-socket.
fn clear_stale(path: &Path) -> Result<(), ListenError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(io_error(format!("stat {}", path.display()))(err)),
    };
    if !meta.file_type().is_socket() {
        return Err(ListenError::NotASocket {
            socket: path.to_path_buf(),
        });
    }
    // Non-blocking: a live server with a full backlog must not hang the start.
    match mio::net::UnixStream::connect(path) {
        // We hold the router lock, so whoever answers is not a router of ours.
        Ok(_) => Err(ListenError::InUse {
            socket: path.to_path_buf(),
        }),
        // Some process listens but its backlog is full: it is alive.
        Err(err) if err.kind() == io::ErrorKind::WouldBlock => Err(ListenError::InUse {
            socket: path.to_path_buf(),
        }),
        Err(_) => {
            log::info!(
                "removing stale socket {} (nobody serves it)",
                path.display()
            );
            Ok(())
        }
    }
}

fn bind_in_place(
    path: &Path,
    mode: u32,
    backlog: i32,
) -> Result<mio::net::UnixListener, ListenError> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let name = path.file_name().map(OsString::from).unwrap_or_default();
    let mut temp_name = OsString::from(".");
    temp_name.push(&name);
    temp_name.push(format!(".{}.tmp", std::process::id()));
    let temp = dir.join(temp_name);
    let _ = fs::remove_file(&temp);

    let fd: OwnedFd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|errno| io_error("create socket")(errno.into()))?;
    let addr = UnixAddr::new(&temp)
        .map_err(|errno| io_error(format!("socket address {}", temp.display()))(errno.into()))?;
    let placed = (|| {
        bind(fd.as_raw_fd(), &addr)
            .map_err(|errno| io_error(format!("bind {}", temp.display()))(errno.into()))?;
        fs::set_permissions(&temp, fs::Permissions::from_mode(mode))
            .map_err(io_error(format!("chmod {}", temp.display())))?;
        let backlog = Backlog::new(backlog).unwrap_or(Backlog::MAXCONN);
        listen(&fd, backlog).map_err(|errno| io_error("listen")(errno.into()))?;
        fs::rename(&temp, path).map_err(io_error(format!(
            "rename {} to {}",
            temp.display(),
            path.display()
        )))
    })();
    if let Err(err) = placed {
        let _ = fs::remove_file(&temp);
        return Err(err);
    }
    let std_listener = std::os::unix::net::UnixListener::from(fd);
    Ok(mio::net::UnixListener::from_std(std_listener))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener as StdListener;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("dsr-listen-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn test_listener_binds_with_mode_and_removes_only_its_own() {
        let dir = temp_dir("mode");
        let path = dir.join("docker.sock");
        let listener = Listener::bind(&path, 0o660, 16).unwrap();
        let meta = fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o660);
        assert!(listener.remove_socket_file());
        assert!(!path.exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn test_listener_second_instance_is_locked_out() {
        let dir = temp_dir("lock");
        let path = dir.join("docker.sock");
        let _first = Listener::bind(&path, 0o666, 16).unwrap();
        let second = Listener::bind(&path, 0o666, 16);
        assert!(matches!(second, Err(ListenError::Locked { .. })));
        assert!(path.exists(), "the first instance's socket is untouched");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn test_listener_replaces_stale_but_not_live_socket() {
        let dir = temp_dir("stale");
        let path = dir.join("docker.sock");
        drop(StdListener::bind(&path).unwrap()); // leaves a stale socket file
        let listener = Listener::bind(&path, 0o666, 16).unwrap();
        drop(listener);

        let live_path = dir.join("live.sock");
        let _live = StdListener::bind(&live_path).unwrap();
        let refused = Listener::bind(&live_path, 0o666, 16);
        assert!(matches!(refused, Err(ListenError::InUse { .. })));
        assert!(live_path.exists());

        let file = dir.join("file.sock");
        fs::write(&file, b"").unwrap();
        assert!(matches!(
            Listener::bind(&file, 0o666, 16),
            Err(ListenError::NotASocket { .. })
        ));
        fs::remove_dir_all(&dir).unwrap();
    }
}
