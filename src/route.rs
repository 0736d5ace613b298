//! Routing: uid → the user's upstream socket path, and the safety checks on that path.
//!
//! Contract:
//! - [`Template`] maps a uid to a path by pure string substitution (`%d` → uid), so routing
//!   never asks NSS (which can block on LDAP) inside the loop.
//! - [`open_checked`] opens the path without following a symlink in any component
//!   (`openat2` with `RESOLVE_NO_SYMLINKS`, or a component-by-component walk on kernels without
//!   `openat2`), as an `O_PATH` descriptor, and accepts it only if it is a socket owned by the uid.
//! - [`connect_checked`] connects through that very descriptor (`/proc/self/fd/N`), so a path
//!   swapped after the check cannot redirect the connection.
//! - Every failure becomes the [`Refusal`] the client will read; nothing here blocks.

use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{AT_FDCWD, OFlag, OpenHow, ResolveFlag, openat, openat2};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat};

use crate::conn::machine::Connect;
use crate::reply::{Forbidden, Refusal};

/// A socket path template with exactly one `%d` standing for the uid (`%%` is a literal `%`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    before: String,
    after: String,
}

/// Why a template was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateError(String);

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Template {
    /// Parses a template such as `/run/user/%d/docker.sock`.
    pub fn parse(text: &str) -> Result<Template, TemplateError> {
        if !text.starts_with('/') {
            return Err(TemplateError(format!(
                "user socket template {text:?} must be an absolute path"
            )));
        }
        if text.contains('\0') {
            return Err(TemplateError(
                "user socket template contains a NUL byte".into(),
            ));
        }
        let mut before = String::new();
        let mut after = String::new();
        let mut seen_uid = false;
        let mut chars = text.chars();
        while let Some(ch) = chars.next() {
            let out = if seen_uid { &mut after } else { &mut before };
            if ch != '%' {
                out.push(ch);
                continue;
            }
            match chars.next() {
                Some('%') => out.push('%'),
                Some('d') if !seen_uid => seen_uid = true,
                Some('d') => {
                    return Err(TemplateError(format!(
                        "user socket template {text:?} has more than one %d"
                    )));
                }
                other => {
                    let what = other.map_or("end of text".to_string(), |c| format!("%{c}"));
                    return Err(TemplateError(format!(
                        "user socket template {text:?}: unsupported {what} (use %d for the uid, \
                         %% for a literal %)"
                    )));
                }
            }
        }
        if !seen_uid {
            return Err(TemplateError(format!(
                "user socket template {text:?} must contain %d (the uid), or every user would \
                 share one socket"
            )));
        }
        Ok(Template { before, after })
    }

    /// The directory part before the uid (`/run/user` for `/run/user/%d/docker.sock`), the same
    /// for every user.
    pub fn fixed_dir(&self) -> &str {
        match self.before.rfind('/') {
            Some(0) | None => "/",
            Some(end) => self.before.get(..end).unwrap_or("/"),
        }
    }

    /// The first existing component of [`Template::fixed_dir`] that is a symlink: since
    /// symlinks are never followed, every user would be refused.
    pub fn symlink_in_fixed_dir(&self) -> Option<std::path::PathBuf> {
        let mut path = std::path::PathBuf::from("/");
        for component in self.fixed_dir().split('/').filter(|c| !c.is_empty()) {
            path.push(component);
            match std::fs::symlink_metadata(&path) {
                Ok(meta) if meta.file_type().is_symlink() => return Some(path),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
        None
    }

    /// The socket path of this uid.
    pub fn path_for(&self, uid: u32) -> String {
        format!("{}{}{}", self.before, uid, self.after)
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}%d{}",
            self.before.replace('%', "%%"),
            self.after.replace('%', "%%")
        )
    }
}

/// Opens `path` as `O_PATH` without following symlinks and checks it is a socket owned by `uid`.
pub fn open_checked(path: &str, uid: u32) -> Result<OwnedFd, Refusal> {
    let forbidden = |why| Refusal::Forbidden {
        uid,
        path: path.to_string(),
        why,
    };
    let fd = match open_no_symlinks(path) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) => {
            return Err(Refusal::DaemonNotRunning {
                uid,
                path: path.to_string(),
            });
        }
        Err(Errno::ELOOP) => return Err(forbidden(Forbidden::Symlink)),
        Err(Errno::ENOTDIR | Errno::EACCES | Errno::EPERM | Errno::EXDEV) => {
            return Err(forbidden(Forbidden::Inaccessible));
        }
        Err(errno) => return Err(Refusal::Internal(format!("cannot open {path}: {errno}"))),
    };
    let stat = fstat(&fd).map_err(|errno| Refusal::Internal(format!("fstat {path}: {errno}")))?;
    check_stat(&stat, uid).map_err(forbidden)?;
    Ok(fd)
}

fn check_stat(stat: &FileStat, uid: u32) -> Result<(), Forbidden> {
    let kind = SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits());
    if kind == SFlag::S_IFLNK {
        Err(Forbidden::Symlink)
    } else if kind != SFlag::S_IFSOCK {
        Err(Forbidden::NotSocket)
    } else if stat.st_uid != uid {
        Err(Forbidden::WrongOwner)
    } else {
        Ok(())
    }
}

fn open_no_symlinks(path: &str) -> Result<OwnedFd, Errno> {
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW)
        .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    match openat2(AT_FDCWD, path, how) {
        Err(Errno::ENOSYS) => open_by_components(path),
        other => other,
    }
}

/// The same check as `RESOLVE_NO_SYMLINKS` for kernels older than 5.6: open each component
/// relative to the previous one with `O_NOFOLLOW`, and reject any component that is a symlink.
fn open_by_components(path: &str) -> Result<OwnedFd, Errno> {
    let flags = OFlag::O_PATH | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW;
    let mut dir = openat(AT_FDCWD, "/", flags | OFlag::O_DIRECTORY, Mode::empty())?;
    let mut components = path.split('/').filter(|c| !c.is_empty()).peekable();
    while let Some(component) = components.next() {
        let next = openat(&dir, component, flags, Mode::empty())?;
        let stat = fstat(&next)?;
        if SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFLNK {
            return Err(Errno::ELOOP);
        }
        if components.peek().is_none() {
            return Ok(next);
        }
        dir = next;
    }
    Err(Errno::ENOENT)
}

/// Connects to the socket behind a checked `O_PATH` descriptor, without blocking.
pub fn connect_checked(target: &impl AsFd) -> io::Result<mio::net::UnixStream> {
    let via = format!("/proc/self/fd/{}", target.as_fd().as_raw_fd());
    crate::io::retry_interrupted(|| mio::net::UnixStream::connect(&via))
}

/// Classifies a failed connect to a user's socket.
pub fn connect_error(err: &io::Error, uid: u32, path: &str) -> Connect {
    match err.kind() {
        io::ErrorKind::WouldBlock => Connect::Busy,
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
            Connect::Failed(Refusal::DaemonNotRunning {
                uid,
                path: path.to_string(),
            })
        }
        io::ErrorKind::PermissionDenied => Connect::Failed(Refusal::Forbidden {
            uid,
            path: path.to_string(),
            why: Forbidden::Inaccessible,
        }),
        _ => Connect::Failed(Refusal::Internal(format!("connect to {path}: {err}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use std::os::unix::net::UnixListener;

    #[test]
    fn test_template_substitutes_uid() {
        let template = Template::parse("/run/user/%d/docker.sock").unwrap();
        assert_eq!(template.path_for(1000), "/run/user/1000/docker.sock");
        assert_eq!(template.to_string(), "/run/user/%d/docker.sock");
        let literal = Template::parse("/srv/100%%/%d.sock").unwrap();
        assert_eq!(literal.path_for(7), "/srv/100%/7.sock");
        assert_eq!(literal.to_string(), "/srv/100%%/%d.sock");
    }

    #[test]
    fn test_template_fixed_dir_and_symlinks_in_it() {
        let template = Template::parse("/run/user/%d/docker.sock").unwrap();
        assert_eq!(template.fixed_dir(), "/run/user");
        assert_eq!(Template::parse("/%d.sock").unwrap().fixed_dir(), "/");
        assert_eq!(
            Template::parse("/srv/u%d/d.sock").unwrap().fixed_dir(),
            "/srv"
        );
        let dir = temp_dir("fixed");
        symlink(&dir, dir.join("alias")).unwrap();
        let through = format!("{}/alias/%d.sock", dir.display());
        let found = Template::parse(&through).unwrap().symlink_in_fixed_dir();
        assert_eq!(found, Some(dir.join("alias")));
        let direct = format!("{}/%d.sock", dir.display());
        assert_eq!(
            Template::parse(&direct).unwrap().symlink_in_fixed_dir(),
            None
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn test_template_rejects_bad_forms() {
        for bad in [
            "run/user/%d/docker.sock",
            "/run/user/docker.sock",
            "/run/%d/%d.sock",
            "/run/%s/docker.sock",
            "/run/%d/x%",
            "/run/%d\0",
        ] {
            assert!(Template::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("dsr-route-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn test_open_checked_accepts_own_socket_and_connects() {
        let dir = temp_dir("own");
        let path = dir.join("d.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let uid = nix::unistd::getuid().as_raw();
        let fd = open_checked(path.to_str().unwrap(), uid).unwrap();
        // Swap the path after the check: the connection still reaches the checked inode.
        std::fs::rename(&path, dir.join("moved.sock")).unwrap();
        let _decoy = UnixListener::bind(&path).unwrap();
        let _stream = connect_checked(&fd).unwrap();
        listener.set_nonblocking(true).unwrap();
        assert!(
            listener.accept().is_ok(),
            "the checked socket got the connection"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn test_open_checked_refuses_symlinks_wrong_owner_and_files() {
        let dir = temp_dir("bad");
        let uid = nix::unistd::getuid().as_raw();
        let real = dir.join("real.sock");
        let _listener = UnixListener::bind(&real).unwrap();
        let link = dir.join("link.sock");
        symlink(&real, &link).unwrap();
        let refusal = open_checked(link.to_str().unwrap(), uid).unwrap_err();
        assert_eq!(refusal.status(), 403);
        assert_eq!(refusal.reason(), "symlink");

        let link_dir = dir.join("linkdir");
        symlink(&dir, &link_dir).unwrap();
        let via_dir = link_dir.join("real.sock");
        assert_eq!(
            open_checked(via_dir.to_str().unwrap(), uid)
                .unwrap_err()
                .reason(),
            "symlink"
        );

        let wrong = open_checked(real.to_str().unwrap(), uid + 1).unwrap_err();
        assert_eq!(wrong.reason(), "wrong-owner");

        let file = dir.join("file");
        std::fs::write(&file, b"x").unwrap();
        assert_eq!(
            open_checked(file.to_str().unwrap(), uid)
                .unwrap_err()
                .reason(),
            "not-a-socket"
        );

        let missing = open_checked(dir.join("none").to_str().unwrap(), uid).unwrap_err();
        assert_eq!(missing.status(), 502);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn test_open_by_components_matches_openat2() {
        let dir = temp_dir("walk");
        let real = dir.join("real.sock");
        let _listener = UnixListener::bind(&real).unwrap();
        symlink(&real, dir.join("link")).unwrap();
        assert!(open_by_components(real.to_str().unwrap()).is_ok());
        assert_eq!(
            open_by_components(dir.join("link").to_str().unwrap()).unwrap_err(),
            Errno::ELOOP
        );
        assert_eq!(
            open_by_components(dir.join("none").to_str().unwrap()).unwrap_err(),
            Errno::ENOENT
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn test_connect_error_classifies() {
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert!(matches!(
            connect_error(&refused, 5, "/p"),
            Connect::Failed(Refusal::DaemonNotRunning { uid: 5, .. })
        ));
        let busy = io::Error::from_raw_os_error(nix::libc::EAGAIN);
        assert_eq!(connect_error(&busy, 5, "/p"), Connect::Busy);
        let denied = io::Error::from(io::ErrorKind::PermissionDenied);
        assert!(matches!(
            connect_error(&denied, 5, "/p"),
            Connect::Failed(Refusal::Forbidden { .. })
        ));
    }
}
