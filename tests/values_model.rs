//! Property tests of the upstream path template (`route::Template`) and the command-line value
//! parsers (`cli`), against the references in `tests/sim/values.rs` (shared with the `template`
//! and `cli_values` fuzz targets).

#[path = "sim/common.rs"]
mod common;
#[allow(dead_code)]
#[path = "sim/values.rs"]
mod values;
use common::{cases, fuzz_seeds};

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::Config;

/// Text made mostly of the characters that matter to each parser.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[/%d%a-z0-9.\\-]{0,24}",
        "(0o)?[0-9]{0,5}",
        " ?[0-9]{0,22}(b|k|K|kb|KiB|m|M|MiB|ms|s|m|h|d|x)? ?",
        "\\+?[0-9]{0,21}",
        any::<String>(),
    ]
}

proptest! {
    #![proptest_config(Config {
        cases: cases(2048),
        failure_persistence: None,
        ..Config::default()
    })]

    #[test]
    fn prop_template_matches_reference(text in text(), a in any::<u32>(), b in any::<u32>()) {
        values::check_template(&text, [a, b]).map_err(TestCaseError::fail)?;
        values::check_template(&format!("/{text}"), [a, b]).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn prop_cli_values_match_reference(text in text(), max in prop_oneof![1usize..600, Just(usize::MAX)]) {
        values::check_values(&text, max).map_err(TestCaseError::fail)?;
    }

    /// Whole command lines built from flag names and values in every spelling.
    #[test]
    fn prop_command_line_is_consistent(
        parts in vec((0usize..12, 0usize..5, text()), 0..6),
    ) {
        let mut args = Vec::new();
        for (flag, spelling, value) in parts {
            let name = values::VALUE_FLAGS.get(flag).copied();
            match (name, spelling) {
                (Some(name), 0) => args.push(format!("-{name}={value}")),
                (Some(name), 1) => args.push(format!("--{name}={value}")),
                (Some(name), 2) => args.extend([format!("--{name}"), value]),
                (Some(name), 3) => args.extend([format!("-{name}"), value]),
                (None, _) if flag == 10 => args.push("-verbose".into()),
                (None, _) if flag == 11 => args.push("--".into()),
                _ => args.push(value),
            }
        }
        values::check_command_line(&args).map_err(TestCaseError::fail)?;
    }
}

#[test]
fn test_template_examples() {
    for (text, ok) in [
        ("/run/user/%d/docker.sock", true),
        ("/srv/%%/%d", true),
        ("/a/%d/%d", false),
        ("relative/%d", false),
        ("/no/uid", false),
        ("/bad/%x/%d", false),
        ("/trailing/%d/%", false),
    ] {
        assert_eq!(values::template_reference(text).is_some(), ok, "{text}");
        values::check_template(text, [1000, 1001]).unwrap();
    }
}

/// The `template` and `cli_values` fuzz seeds pass.
#[test]
fn test_fuzz_seeds_template_and_cli_values() {
    for (name, bytes) in fuzz_seeds("template") {
        if let Err(violation) = values::check_template_input(&bytes) {
            panic!("template seed {name}: {violation}");
        }
    }
    for (name, bytes) in fuzz_seeds("cli_values") {
        if let Err(violation) = values::check_cli_input(&bytes) {
            panic!("cli_values seed {name}: {violation}");
        }
    }
}

/// Found by the `cli_values` fuzzer (seed `regression-switch-value-orphaned-by-last-wins`): a
/// switch given a value with `=` is split into the switch and a free argument, so Go's
/// `-verbose=false` is refused ("Unrecognized argument: false") and `-verbose=--version` prints
/// the version. Go's `flag` package takes `-name=true|false` for a boolean flag; unit files
/// written for the Go tool may use it.
#[test]
fn test_cli_switch_with_a_value_is_not_split() {
    use docker_socket_router::cli::{Command, parse};
    let args = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let verbose = |list: &[&str]| match parse("p", &args(list)) {
        Ok(Command::Run(config)) => Ok(config.verbose),
        Ok(Command::Version) => Err("version".to_string()),
        Err(exit) => Err(exit.output),
    };
    assert_eq!(verbose(&["-verbose=false"]), Ok(false));
    assert_eq!(verbose(&["-verbose=true"]), Ok(true));
    assert!(verbose(&["-verbose=--version"]).is_err(), "not the version");
}
