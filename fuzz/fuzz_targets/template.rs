//! The upstream path template (`route::Template`): parse accepts exactly the templates the
//! reference accepts (absolute, no NUL, one `%d`, `%%` for `%`, nothing else after `%`), maps a
//! uid by substitution only, never maps two uids to one path, and displays as text that parses
//! back to the same template. Input layout: two uids (4 bytes each), then the template text.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../tests/sim/values.rs"]
mod values;

fuzz_target!(|data: &[u8]| {
    if let Err(violation) = values::check_template_input(data) {
        panic!("{violation}");
    }
});
