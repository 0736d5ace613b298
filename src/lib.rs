//! docker-socket-router: route `/var/run/docker.sock` to each user's own rootless Docker daemon.
//!
//! The library holds the whole daemon so that tests and fuzz targets reach the pure core
//! (`conn::machine`, `ring`, `head`, `route::Template`, `cli` value parsers); `main.rs` only
//! parses the command line, sets up logging and runs [`daemon::Daemon`].

#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod cli;
pub mod conn;
pub mod daemon;
pub mod head;
pub mod io;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod peercred;
pub mod reply;
pub mod ring;
pub mod route;
pub mod signals;
pub mod token;

/// The version and the git commit it was built from.
pub fn version() -> String {
    format!(
        "docker-socket-router {} (commit {})",
        env!("CARGO_PKG_VERSION"),
        env!("DSR_GIT_COMMIT")
    )
}
