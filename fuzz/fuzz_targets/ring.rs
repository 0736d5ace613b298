//! The ring buffer (`ring::Ring`) against a reference queue (`VecDeque<u8>`), through
//! `tests/sim/ring_ref.rs` (shared with `tests/ring_model.rs`): lengths, slices, two-round fills
//! and drains, wrap-around, release, and byte order checked after every operation.
//! Input layout: capacity (1 byte, 0 to 79), then two bytes per operation.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../tests/sim/ring_ref.rs"]
mod ring_ref;

fuzz_target!(|data: &[u8]| {
    if let Err(violation) = ring_ref::check_input(data) {
        panic!("{violation}");
    }
});
