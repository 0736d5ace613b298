//! Command-line values: `parse_mode`, `parse_size`, `parse_duration` and `parse_count` against
//! references (accept exactly the documented forms, round-trip what they accept), and the whole
//! command line (`normalize_args` + `parse`): nothing after `--` is rewritten, Go-style
//! `-name=value` means the same as `--name value`, and an accepted configuration honours every
//! documented bound. Input: NUL-separated arguments; the first byte picks the count's maximum.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../tests/sim/values.rs"]
mod values;

fuzz_target!(|data: &[u8]| {
    if let Err(violation) = values::check_cli_input(data) {
        panic!("{violation}");
    }
});
