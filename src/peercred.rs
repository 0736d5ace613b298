//! Peer credentials from the kernel.
//!
//! Contract: identity comes only from `SO_PEERCRED` on the accepted socket, read right after
//! accept; nothing the client sends can change it.

use std::io;
use std::os::fd::AsFd;

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};

/// Who is on the other end of a Unix socket, as the kernel recorded it at connect time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerCred {
    pub uid: u32,
    pub gid: u32,
    pub pid: i32,
}

/// Reads `SO_PEERCRED` of a connected Unix socket.
pub fn peer_cred(socket: &impl AsFd) -> io::Result<PeerCred> {
    let cred = getsockopt(socket, PeerCredentials).map_err(io::Error::from)?;
    Ok(PeerCred {
        uid: cred.uid(),
        gid: cred.gid(),
        pid: cred.pid(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn test_peer_cred_of_socketpair_is_ourselves() {
        let (a, _b) = UnixStream::pair().unwrap();
        let cred = peer_cred(&a).unwrap();
        assert_eq!(cred.uid, nix::unistd::getuid().as_raw());
        assert_eq!(cred.gid, nix::unistd::getgid().as_raw());
        assert_eq!(cred.pid, std::process::id() as i32);
    }
}
