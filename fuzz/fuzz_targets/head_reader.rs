//! The refusal path's request-head reader (`head::HeadReader`) against a whole-input reference
//! (`tests/sim/head_ref.rs`): same status, same bytes consumed, same `HEAD` detection, in any
//! chunking and with any size bound; it never reads past its bound and a decision never changes.
//! Input layout: limit (2 bytes), number of chunk sizes (1 byte), chunk sizes, then the bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../tests/sim/head_ref.rs"]
mod head_ref;

fuzz_target!(|data: &[u8]| {
    if let Err(violation) = head_ref::check_input(data) {
        panic!("{violation}");
    }
});
