//! References for the upstream path template (`route::Template`) and the command-line value
//! parsers (`cli::parse_mode`, `parse_size`, `parse_duration`, `parse_count`, `normalize_args`,
//! `parse`).

use std::time::Duration;

use docker_socket_router::cli::{self, Command, MAX_BUFFER, MIN_BUFFER};
use docker_socket_router::route::Template;

/// The template rules restated: absolute, no NUL, `%%` is `%`, exactly one `%d`, no other `%`.
/// Returns the text before and after the uid.
pub fn template_reference(text: &str) -> Option<(String, String)> {
    if !text.starts_with('/') || text.contains('\0') {
        return None;
    }
    let mut parts = vec![String::new()];
    let mut chars = text.chars();
    while let Some(ch) = chars.next() {
        if ch == '%' {
            match chars.next() {
                Some('%') => parts.last_mut()?.push('%'),
                Some('d') => parts.push(String::new()),
                _ => return None,
            }
        } else {
            parts.last_mut()?.push(ch);
        }
    }
    match <[String; 2]>::try_from(parts) {
        Ok([before, after]) => Some((before, after)),
        Err(_) => None,
    }
}

/// Checks `Template::parse` on `text` against the reference, and what a parsed template does.
pub fn check_template(text: &str, uids: [u32; 2]) -> Result<(), String> {
    let parsed = Template::parse(text);
    let reference = template_reference(text);
    match (&parsed, &reference) {
        (Ok(template), Some((before, after))) => {
            for uid in uids {
                let path = template.path_for(uid);
                let want = format!("{before}{uid}{after}");
                if path != want {
                    return Err(format!("{text:?} uid {uid}: {path:?}, want {want:?}"));
                }
                if !path.starts_with('/') || path.contains('\0') {
                    return Err(format!("{text:?} gives an unsafe path {path:?}"));
                }
            }
            // Every user's socket lies under the one fixed directory the start-up check inspects.
            let dir = template.fixed_dir();
            for uid in uids {
                let path = template.path_for(uid);
                let under = path.starts_with(dir)
                    && (dir == "/" || path.as_bytes().get(dir.len()) == Some(&b'/'));
                if !under || !dir.starts_with('/') {
                    return Err(format!("{text:?}: {path:?} is not under fixed_dir {dir:?}"));
                }
            }
            // Two users never share a socket path.
            if uids[0] != uids[1] && template.path_for(uids[0]) == template.path_for(uids[1]) {
                return Err(format!("{text:?} maps uids {uids:?} to one path"));
            }
            // Display gives a template that parses back to the same thing.
            let shown = template.to_string();
            match Template::parse(&shown) {
                Ok(again) if &again == template => Ok(()),
                other => Err(format!(
                    "{text:?} displays as {shown:?}, which parses as {other:?}"
                )),
            }
        }
        (Err(_), None) => Ok(()),
        (Ok(template), None) => Err(format!(
            "{text:?} accepted as {template:?}; must be refused"
        )),
        (Err(err), Some(_)) => Err(format!("{text:?} refused ({err}); must be accepted")),
    }
}

fn mode_reference(text: &str) -> Option<u32> {
    let digits = text.strip_prefix("0o").unwrap_or(text);
    if digits.is_empty() || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        return None;
    }
    // Leading zeros are fine; the value must fit in 0o777.
    let significant = digits.trim_start_matches('0');
    if significant.len() > 3 {
        return None;
    }
    let mode = significant
        .bytes()
        .fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
    (mode <= 0o777).then_some(mode)
}

fn decimal(text: &str) -> Option<u128> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let significant = text.trim_start_matches('0');
    if significant.len() > 30 {
        return None; // far beyond any accepted value
    }
    Some(
        significant
            .bytes()
            .fold(0u128, |acc, b| acc * 10 + u128::from(b - b'0')),
    )
}

fn size_reference(text: &str) -> Option<usize> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let multiplier: u128 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        _ => return None,
    };
    let value = decimal(number)?.checked_mul(multiplier)?;
    let in_range = (MIN_BUFFER as u128..=MAX_BUFFER as u128).contains(&value);
    in_range.then_some(value as usize)
}

fn duration_reference(text: &str) -> Option<Duration> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let per_unit: u128 = match unit {
        "ms" => 1,
        "" | "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return None,
    };
    let millis = decimal(number)?.checked_mul(per_unit)?;
    (millis <= 86_400_000).then_some(Duration::from_millis(millis as u64))
}

fn count_reference(text: &str, max: usize) -> Option<usize> {
    let digits = text.strip_prefix('+').unwrap_or(text);
    let value = decimal(digits)?;
    (1..=max as u128).contains(&value).then_some(value as usize)
}

/// Checks every value parser on `text` against its reference, and round trips of accepted values.
pub fn check_values(text: &str, max: usize) -> Result<(), String> {
    let mode = cli::parse_mode(text).ok();
    if mode != mode_reference(text) {
        return Err(format!(
            "parse_mode({text:?}) = {mode:?}, reference {:?}",
            mode_reference(text)
        ));
    }
    if let Some(mode) = mode
        && cli::parse_mode(&format!("0{mode:o}")) != Ok(mode)
    {
        return Err(format!("mode {mode:o} does not round-trip"));
    }
    let size = cli::parse_size(text).ok();
    if size != size_reference(text) {
        return Err(format!(
            "parse_size({text:?}) = {size:?}, reference {:?}",
            size_reference(text)
        ));
    }
    if let Some(size) = size
        && (cli::parse_size(&size.to_string()) != Ok(size)
            || (size % 1024 == 0 && cli::parse_size(&format!("{}K", size / 1024)) != Ok(size)))
    {
        return Err(format!("size {size} does not round-trip"));
    }
    let duration = cli::parse_duration(text).ok();
    if duration != duration_reference(text) {
        return Err(format!(
            "parse_duration({text:?}) = {duration:?}, reference {:?}",
            duration_reference(text)
        ));
    }
    if let Some(duration) = duration
        && cli::parse_duration(&format!("{}ms", duration.as_millis())) != Ok(duration)
    {
        return Err(format!("duration {duration:?} does not round-trip"));
    }
    let count = cli::parse_count(text, max).ok();
    if count != count_reference(text, max) {
        return Err(format!(
            "parse_count({text:?}, {max}) = {count:?}, reference {:?}",
            count_reference(text, max)
        ));
    }
    Ok(())
}

/// Options that take a value, as the user writes them.
pub const VALUE_FLAGS: &[&str] = &[
    "socket",
    "user-socket",
    "socket-mode",
    "max-connections",
    "max-connections-per-user",
    "buffer-size",
    "connect-timeout",
    "shutdown-timeout",
    "log-target",
    "syslog-socket",
];

/// Checks the whole command line: `normalize_args` keeps everything after `--` verbatim, the
/// Go spellings mean the same as the long ones, the last of repeated flags wins, and an accepted
/// configuration satisfies every documented bound.
///
/// (`normalize_args` is not idempotent: a switch given a value, `-verbose=-socket`, leaves the
/// value behind as an argument of its own, which a second pass rewrites into a flag. The router
/// normalizes once, so that is not checked; see `regression-switch-value-orphaned-by-last-wins`.)
pub fn check_command_line(args: &[String]) -> Result<(), String> {
    let normalized = cli::normalize_args(args);
    if let Some(dashes) = args.iter().position(|a| a == "--") {
        // Arguments before a literal `--` may not be rewritten into one (`-=x` becomes `--`), so
        // only check the tail when the prefix produced exactly one `--`.
        let prefix = cli::normalize_args(&args[..dashes]);
        if !prefix.iter().any(|a| a == "--") && !prefix_expects_value(&prefix) {
            let tail = &normalized[prefix.len()..];
            if tail != &args[dashes..] {
                return Err(format!(
                    "arguments after -- were rewritten: {args:?} -> {normalized:?}"
                ));
            }
        }
    }
    let parsed = cli::parse("docker-socket-router", args);
    if let Ok(Command::Run(config)) = &parsed {
        let config = &**config;
        let bounds = [
            (config.socket_mode <= 0o777, "socket mode <= 0777"),
            (config.max_connections >= 1, "max connections >= 1"),
            (
                (1..=config.max_connections).contains(&config.max_connections_per_user),
                "per-user limit within the global one",
            ),
            (
                (MIN_BUFFER..=MAX_BUFFER).contains(&config.buffer_size),
                "buffer size in range",
            ),
            (!config.connect_timeout.is_zero(), "connect timeout > 0"),
            (
                config.connect_timeout <= Duration::from_secs(86_400)
                    && config.shutdown_timeout <= Duration::from_secs(86_400),
                "durations at most a day",
            ),
            (
                !config.socket.as_os_str().is_empty(),
                "a listening socket path",
            ),
            (
                config.user_socket.path_for(7).starts_with('/'),
                "an absolute user socket template",
            ),
        ];
        for (ok, what) in bounds {
            if !ok {
                return Err(format!(
                    "{args:?} accepted with a bad config ({what}): {config:?}"
                ));
            }
        }
    }
    // `-name=value`, `--name=value` and `--name value` are one thing, and of repeated flags the
    // last one wins (as with Go's `flag` package).
    if let Some(long) = spelled_long(args) {
        same_parse(args, &long)?;
        same_parse(args, &keep_last(&long))?;
    }
    Ok(())
}

/// What a command line parses to, as text: the configuration, `version`, or the error's text.
fn parse_summary(args: &[String]) -> Result<String, String> {
    match cli::parse("docker-socket-router", args) {
        Ok(Command::Run(config)) => Ok(format!("{config:?}")),
        Ok(Command::Version) => Ok("version".into()),
        Err(exit) => Err(exit.output),
    }
}

/// Two command lines mean the same: the same configuration, or both refused.
fn same_parse(args: &[String], other_args: &[String]) -> Result<(), String> {
    match (parse_summary(args), parse_summary(other_args)) {
        (Ok(a), Ok(b)) if a == b => Ok(()),
        (Err(_), Err(_)) => Ok(()),
        (a, b) => Err(format!(
            "{args:?} and {other_args:?} parse differently: {a:?} vs {b:?}"
        )),
    }
}

/// Keeps only the last occurrence of each flag of a `--flag [value]` list.
fn keep_last(long: &[String]) -> Vec<String> {
    let mut items: Vec<&[String]> = Vec::new();
    let mut index = 0;
    while index < long.len() {
        let takes_value = VALUE_FLAGS.iter().any(|f| long[index] == format!("--{f}"));
        let len = if takes_value { 2 } else { 1 }.min(long.len() - index);
        items.push(&long[index..index + len]);
        index += len;
    }
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        if !items[i + 1..].iter().any(|later| later[0] == item[0]) {
            out.extend(item.iter().cloned());
        }
    }
    out
}

fn prefix_expects_value(prefix: &[String]) -> bool {
    prefix
        .last()
        .is_some_and(|last| VALUE_FLAGS.iter().any(|f| last == &format!("--{f}")))
}

/// Rewrites simple Go-style arguments (`-flag=value`, `-switch`) of a plain argument list into
/// the `--flag value` form by hand; `None` when the list holds anything less simple.
fn spelled_long(args: &[String]) -> Option<Vec<String>> {
    let mut out = Vec::new();
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        let name = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-'))?;
        if name.is_empty() || name.starts_with('-') {
            return None;
        }
        match name.split_once('=') {
            Some((flag, value)) if VALUE_FLAGS.contains(&flag) => {
                out.push(format!("--{flag}"));
                out.push(value.to_string());
            }
            Some(_) => return None,
            None if VALUE_FLAGS.contains(&name) => {
                out.push(format!("--{name}"));
                out.push(iter.next()?.clone());
            }
            None if name == "verbose" || name == "version" => out.push(format!("--{name}")),
            None => return None,
        }
    }
    Some(out)
}

/// Decodes a `template` fuzz input and checks it: two uids (4 bytes each), then the text.
pub fn check_template_input(data: &[u8]) -> Result<(), String> {
    if data.len() < 8 {
        return Ok(());
    }
    let uid = |at: usize| u32::from_le_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]);
    check_template(&String::from_utf8_lossy(&data[8..]), [uid(0), uid(4)])
}

/// Decodes a `cli_values` fuzz input and checks it: a selector byte (the count's maximum and
/// how flags are spelled), then NUL-separated arguments. Each argument goes through every value
/// parser; then the arguments as given, and again behind known flag names in every spelling,
/// go through the whole command line.
pub fn check_cli_input(data: &[u8]) -> Result<(), String> {
    let Some((&selector, rest)) = data.split_first() else {
        return Ok(());
    };
    let selector = usize::from(selector);
    let text = String::from_utf8_lossy(rest);
    let args: Vec<String> = text.split('\0').map(str::to_string).collect();
    let max = [1, 2, 128, 512, 1 << 19, usize::MAX][selector % 6];
    for arg in &args {
        check_values(arg, max)?;
    }
    let mut command_line = Vec::new();
    for (i, arg) in args.iter().enumerate() {
        let flag = VALUE_FLAGS[(selector + i) % VALUE_FLAGS.len()];
        match ((selector >> 3) + i) % 4 {
            0 => command_line.push(arg.clone()),
            1 => command_line.push(format!("-{flag}={arg}")),
            2 => command_line.extend([format!("--{flag}"), arg.clone()]),
            _ => command_line.push(format!("--{flag}={arg}")),
        }
    }
    check_command_line(&command_line)?;
    check_command_line(&args)
}
