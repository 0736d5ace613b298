//! The command line: flags, defaults, validation.
//!
//! Contract: [`parse`] turns the process arguments into a validated [`Config`] or an
//! [`argh::EarlyExit`] whose text explains the problem in one line (or the help). Go-style
//! single-dash long flags (`-verbose`, `-socket=/x`) and `--flag=value` are accepted too, so unit
//! files written for the Go tool keep working. Value parsers are pure and public for fuzzing.

use std::path::PathBuf;
use std::time::Duration;

use argh::FromArgs;

use crate::route::Template;

pub const DEFAULT_SOCKET: &str = "/var/run/docker.sock";
pub const DEFAULT_USER_SOCKET: &str = "/run/user/%d/docker.sock";
/// The per-user limit when none is given (never above the global one).
const DEFAULT_PER_USER: usize = 128;
/// Above this, a slot index would not fit a poll token with room to spare.
const MAX_CONNECTIONS_LIMIT: usize = 1 << 19;

/// Route /var/run/docker.sock to each user's own rootless Docker daemon.
#[derive(FromArgs, Debug)]
pub struct Args {
    /// the socket to listen on (default /var/run/docker.sock)
    #[argh(option, default = "DEFAULT_SOCKET.into()")]
    pub socket: String,

    /// per-user upstream socket, %d is the uid (default /run/user/%d/docker.sock)
    #[argh(option, default = "DEFAULT_USER_SOCKET.into()")]
    pub user_socket: String,

    /// permissions of the listening socket, octal (default 0666)
    #[argh(option, default = "String::from(\"0666\")")]
    pub socket_mode: String,

    /// most connections served at once (default 512)
    #[argh(option, default = "String::from(\"512\")")]
    pub max_connections: String,

    /// most connections one user may have at once (default 128, at most --max-connections)
    #[argh(option)]
    pub max_connections_per_user: Option<String>,

    /// buffer per direction of a connection, e.g. 32768 or 32K (default 32K)
    #[argh(option, default = "String::from(\"32K\")")]
    pub buffer_size: String,

    /// how long to retry a user daemon whose backlog is full, e.g. 5s or 500ms (default 5s)
    #[argh(option, default = "String::from(\"5s\")")]
    pub connect_timeout: String,

    /// grace period for open connections on SIGTERM, e.g. 10s (default 10s)
    #[argh(option, default = "String::from(\"10s\")")]
    pub shutdown_timeout: String,

    /// where logs go: auto (syslog unless stderr is a terminal), syslog or stderr
    #[argh(option, default = "String::from(\"auto\")")]
    pub log_target: String,

    /// the syslog datagram socket (default /dev/log)
    #[argh(option, default = "String::from(\"/dev/log\")")]
    pub syslog_socket: String,

    /// log state changes and other debug lines
    #[argh(switch)]
    pub verbose: bool,

    /// print the version and git commit, then exit
    #[argh(switch)]
    pub version: bool,
}

/// Where log lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogTarget {
    Auto,
    Syslog,
    Stderr,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub socket: PathBuf,
    pub user_socket: Template,
    pub socket_mode: u32,
    pub max_connections: usize,
    pub max_connections_per_user: usize,
    pub buffer_size: usize,
    pub connect_timeout: Duration,
    pub shutdown_timeout: Duration,
    pub log_target: LogTarget,
    pub syslog_socket: PathBuf,
    pub verbose: bool,
}

/// What the command line asks for.
#[derive(Debug)]
pub enum Command {
    Run(Box<Config>),
    Version,
}

/// Options that take a value; their values are never rewritten as flags.
const VALUE_OPTIONS: &[&str] = &[
    "--socket",
    "--user-socket",
    "--socket-mode",
    "--max-connections",
    "--max-connections-per-user",
    "--buffer-size",
    "--connect-timeout",
    "--shutdown-timeout",
    "--log-target",
    "--syslog-socket",
];

/// Flags without a value.
const SWITCHES: &[&str] = &["--verbose", "--version", "--help"];

/// Go's `strconv.ParseBool` spellings.
fn go_bool(text: &str) -> Option<bool> {
    match text {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

/// Rewrites Go-style `-name` and `--name=value` arguments into the `--name value` form, `-h`
/// into `--help`, and keeps only the last of repeated flags (as Go's `flag` package does).
pub fn normalize_args(args: &[String]) -> Vec<String> {
    let rewritten = rewrite_go_style(args);
    // Group into (flag, value?) items, then drop every item a later one repeats.
    let mut items: Vec<&[String]> = Vec::new();
    let mut index = 0;
    while let Some(arg) = rewritten.get(index) {
        let takes_value = VALUE_OPTIONS.contains(&arg.as_str());
        if arg == "--" {
            items.push(rewritten.get(index..).unwrap_or_default());
            break;
        }
        let len = if takes_value && index + 1 < rewritten.len() {
            2
        } else {
            1
        };
        items.push(rewritten.get(index..index + len).unwrap_or_default());
        index += len;
    }
    let mut out = Vec::with_capacity(rewritten.len());
    for (position, item) in items.iter().enumerate() {
        let name = item.first().map(String::as_str).unwrap_or_default();
        let repeated_later = name.starts_with("--")
            && name != "--"
            && items
                .get(position + 1..)
                .unwrap_or_default()
                .iter()
                .any(|later| later.first().map(String::as_str) == Some(name));
        if !repeated_later {
            out.extend(item.iter().cloned());
        }
    }
    out
}

fn rewrite_go_style(args: &[String]) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len());
    let mut expect_value = false;
    let mut rest_are_positional = false;
    for arg in args {
        if expect_value || rest_are_positional {
            out.push(arg.clone());
            expect_value = false;
            continue;
        }
        if arg == "--" {
            rest_are_positional = true;
            out.push(arg.clone());
            continue;
        }
        if arg == "-h" {
            out.push("--help".into());
            continue;
        }
        let long = if arg.starts_with("--") {
            arg.clone()
        } else if arg.len() > 2 && arg.starts_with('-') {
            format!("-{arg}")
        } else {
            out.push(arg.clone());
            continue;
        };
        match long.split_once('=') {
            // A switch takes Go's boolean spellings (`-verbose=false`); anything else stays one
            // argument, which the parser then rejects by name.
            Some((name, value)) if SWITCHES.contains(&name) => match go_bool(value) {
                Some(true) => out.push(name.to_string()),
                Some(false) => {}
                None => out.push(long.clone()),
            },
            Some((name, value)) => {
                out.push(name.to_string());
                out.push(value.to_string());
            }
            None => {
                expect_value = VALUE_OPTIONS.contains(&long.as_str());
                out.push(long);
            }
        }
    }
    out
}

fn early_exit(message: String) -> argh::EarlyExit {
    argh::EarlyExit {
        output: message,
        status: Err(()),
    }
}

/// Parses and validates the arguments after the program name.
pub fn parse(program: &str, args: &[String]) -> Result<Command, argh::EarlyExit> {
    let normalized = normalize_args(args);
    let refs: Vec<&str> = normalized.iter().map(String::as_str).collect();
    let args = Args::from_args(&[program], &refs)?;
    if args.version {
        return Ok(Command::Version);
    }
    validate(args)
        .map(|config| Command::Run(Box::new(config)))
        .map_err(|message| early_exit(format!("{program}: {message}")))
}

fn validate(args: Args) -> Result<Config, String> {
    if args.socket.is_empty() {
        return Err("--socket must not be empty".into());
    }
    let user_socket = Template::parse(&args.user_socket).map_err(|err| err.to_string())?;
    let socket_mode = parse_mode(&args.socket_mode).map_err(|e| format!("--socket-mode: {e}"))?;
    let max_connections = parse_count(&args.max_connections, MAX_CONNECTIONS_LIMIT)
        .map_err(|e| format!("--max-connections: {e}"))?;
    let max_connections_per_user = match &args.max_connections_per_user {
        Some(text) => parse_count(text, max_connections)
            .map_err(|e| format!("--max-connections-per-user: {e} (at most --max-connections)"))?,
        None => DEFAULT_PER_USER.min(max_connections),
    };
    let buffer_size = parse_size(&args.buffer_size).map_err(|e| format!("--buffer-size: {e}"))?;
    let connect_timeout = parse_duration(&args.connect_timeout)
        .and_then(non_zero)
        .map_err(|e| format!("--connect-timeout: {e}"))?;
    let shutdown_timeout =
        parse_duration(&args.shutdown_timeout).map_err(|e| format!("--shutdown-timeout: {e}"))?;
    let log_target = match args.log_target.as_str() {
        "auto" => LogTarget::Auto,
        "syslog" => LogTarget::Syslog,
        "stderr" => LogTarget::Stderr,
        other => {
            return Err(format!(
                "--log-target: {other:?} is not one of auto, syslog, stderr"
            ));
        }
    };
    Ok(Config {
        socket: PathBuf::from(args.socket),
        user_socket,
        socket_mode,
        max_connections,
        max_connections_per_user,
        buffer_size,
        connect_timeout,
        shutdown_timeout,
        log_target,
        syslog_socket: PathBuf::from(args.syslog_socket),
        verbose: args.verbose,
    })
}

fn non_zero(duration: Duration) -> Result<Duration, String> {
    if duration.is_zero() {
        Err("must be more than zero".into())
    } else {
        Ok(duration)
    }
}

/// Parses an octal permission mode such as `0666` or `660`.
pub fn parse_mode(text: &str) -> Result<u32, String> {
    let digits = text.strip_prefix("0o").unwrap_or(text);
    if digits.is_empty() || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        return Err(format!("{text:?} is not an octal mode like 0666"));
    }
    match u32::from_str_radix(digits, 8) {
        Ok(mode) if mode <= 0o777 => Ok(mode),
        _ => Err(format!("{text:?} is not a permission mode (at most 0777)")),
    }
}

/// Parses a count from 1 to `max`.
pub fn parse_count(text: &str, max: usize) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        Ok(n) => Err(format!("{n} is out of range (1 to {max})")),
        Err(_) => Err(format!("{text:?} is not a whole number")),
    }
}

/// The smallest and largest ring size accepted on the command line.
pub const MIN_BUFFER: usize = 1024;
pub const MAX_BUFFER: usize = 16 << 20;

/// Parses a byte size: `65536`, `64K`, `64KiB`, `1M`, `1MiB` (K and M are powers of 1024).
pub fn parse_size(text: &str) -> Result<usize, String> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let multiplier: usize = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        _ => return Err(format!("{text:?}: unknown unit (use a number, K or M)")),
    };
    let value = number
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(multiplier))
        .ok_or_else(|| format!("{text:?} is not a size like 32768 or 32K"))?;
    if !(MIN_BUFFER..=MAX_BUFFER).contains(&value) {
        return Err(format!(
            "{value} bytes is out of range ({MIN_BUFFER} to {MAX_BUFFER})"
        ));
    }
    Ok(value)
}

/// Parses a duration: `5s`, `500ms`, `2m`, `1h`, or plain seconds `5`; at most one day.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let value: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 5s or 500ms"))?;
    let millis_per_unit: u64 = match unit {
        "ms" => 1,
        "" | "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(format!("{text:?}: unknown unit (use ms, s, m or h)")),
    };
    let millis = value
        .checked_mul(millis_per_unit)
        .filter(|&ms| ms <= 86_400_000)
        .ok_or_else(|| format!("{text:?} is too long (at most one day)"))?;
    Ok(Duration::from_millis(millis))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    fn config(args: &[&str]) -> Result<Config, String> {
        match parse("docker-socket-router", &strings(args)) {
            Ok(Command::Run(config)) => Ok(*config),
            Ok(Command::Version) => Err("version".into()),
            Err(exit) => Err(exit.output),
        }
    }

    #[test]
    fn test_cli_defaults() {
        let config = config(&[]).unwrap();
        assert_eq!(config.socket, PathBuf::from("/var/run/docker.sock"));
        assert_eq!(
            config.user_socket.path_for(1000),
            "/run/user/1000/docker.sock"
        );
        assert_eq!(config.socket_mode, 0o666);
        assert_eq!(config.max_connections, 512);
        assert_eq!(config.max_connections_per_user, 128);
        assert_eq!(config.buffer_size, 32 * 1024);
        assert_eq!(config.connect_timeout, Duration::from_secs(5));
        assert_eq!(config.shutdown_timeout, Duration::from_secs(10));
        assert_eq!(config.log_target, LogTarget::Auto);
        assert!(!config.verbose);
    }

    #[test]
    fn test_cli_go_style_single_dash_and_equals() {
        let config = config(&["-verbose", "-socket=/tmp/x.sock", "--buffer-size=64K"]).unwrap();
        assert!(config.verbose);
        assert_eq!(config.socket, PathBuf::from("/tmp/x.sock"));
        assert_eq!(config.buffer_size, 65536);
        assert!(matches!(
            parse("p", &strings(&["-version"])),
            Ok(Command::Version)
        ));
        assert!(matches!(
            parse("p", &strings(&["--version"])),
            Ok(Command::Version)
        ));
    }

    #[test]
    fn test_cli_repeated_flags_last_one_wins_and_dash_h_is_help() {
        let config = config(&["--socket", "/a", "-socket=/b", "-verbose", "--verbose"]).unwrap();
        assert_eq!(config.socket, PathBuf::from("/b"));
        assert!(config.verbose);
        let help = parse("p", &strings(&["-h"])).unwrap_err();
        assert!(help.status.is_ok() && help.output.contains("--user-socket"));
    }

    #[test]
    fn test_cli_per_user_default_follows_a_small_global_limit() {
        assert_eq!(
            config(&["--max-connections", "100"])
                .unwrap()
                .max_connections_per_user,
            100
        );
        assert_eq!(
            config(&["--max-connections", "1000"])
                .unwrap()
                .max_connections_per_user,
            128
        );
    }

    #[test]
    fn test_cli_values_are_not_rewritten() {
        let normalized = normalize_args(&strings(&["--socket", "-odd-name", "-verbose"]));
        assert_eq!(normalized, strings(&["--socket", "-odd-name", "--verbose"]));
    }

    #[test]
    fn test_cli_rejects_invalid_values_with_a_clear_message() {
        for (args, needle) in [
            (&["--socket-mode", "999"][..], "--socket-mode"),
            (&["--max-connections", "0"][..], "--max-connections"),
            (
                &[
                    "--max-connections",
                    "10",
                    "--max-connections-per-user",
                    "11",
                ][..],
                "per-user",
            ),
            (&["--buffer-size", "12"][..], "--buffer-size"),
            (&["--buffer-size", "1G"][..], "--buffer-size"),
            (&["--connect-timeout", "0s"][..], "--connect-timeout"),
            (&["--shutdown-timeout", "soon"][..], "--shutdown-timeout"),
            (&["--log-target", "file"][..], "--log-target"),
            (&["--user-socket", "/run/user/docker.sock"][..], "%d"),
            (&["--no-such-flag"][..], "no-such-flag"),
        ] {
            let err = config(args).unwrap_err();
            assert!(err.contains(needle), "{args:?}: {err}");
        }
    }

    #[test]
    fn test_cli_value_parsers() {
        assert_eq!(parse_mode("0600"), Ok(0o600));
        assert_eq!(parse_mode("0o644"), Ok(0o644));
        assert!(
            parse_mode("").is_err() && parse_mode("8").is_err() && parse_mode("01777").is_err()
        );
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("18446744073709551615K").is_err());
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("2d").is_err() && parse_duration("25h").is_err());
        assert!(parse_duration("-1s").is_err());
    }
}
