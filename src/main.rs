//! The binary: parse the command line, set up logging, run the loop; exit codes live only here.
//!
//! Exit codes: 0 after a clean stop (or `--help`, `--version`); 1 when the router cannot start
//! (the one-line reason goes to stderr and to the log); 2 for invalid command-line values.

use std::process::ExitCode;

use docker_socket_router::cli::{self, Command};
use docker_socket_router::daemon::Daemon;
use docker_socket_router::logging::{self, Chosen};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let program = args
        .first()
        .and_then(|p| p.rsplit('/').next())
        .unwrap_or("docker-socket-router")
        .to_string();
    let rest = args.get(1..).unwrap_or(&[]);
    let config = match cli::parse(&program, rest) {
        Ok(Command::Run(config)) => config,
        Ok(Command::Version) => {
            println!("{}", docker_socket_router::version());
            return ExitCode::SUCCESS;
        }
        Err(exit) if exit.status.is_ok() => {
            println!("{}", exit.output.trim_end());
            return ExitCode::SUCCESS;
        }
        Err(exit) => {
            eprintln!("{}", exit.output.trim_end());
            return ExitCode::from(2);
        }
    };
    let chosen = logging::init(config.log_target, &config.syslog_socket, config.verbose);
    log::info!("{} starting", docker_socket_router::version());
    let result = Daemon::new(*config).and_then(Daemon::run);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            log::error!("cannot start: {err}");
            if chosen == Chosen::Syslog {
                eprintln!("{program}: cannot start: {err}");
            }
            ExitCode::from(1)
        }
    }
}
