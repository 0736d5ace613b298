//! The connection state machine driven by a decoded sequence of operations: readiness edges
//! (owed or spurious), reads and writes of any size, `WouldBlock` anywhere, end of stream, resets
//! and errors on either side, time passing, stale timers and aborts, on the pipe path and every
//! refusal path. The harness (`tests/sim/mod.rs`, shared with `tests/machine_model.rs`) checks the
//! reference model and the machine's invariants after every step, then requires the connection to
//! end with every byte delivered once both peers cooperate. Any violation panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/sim/mod.rs"]
mod sim;

fuzz_target!(|data: &[u8]| {
    if let Err(violation) = sim::Sim::check_input(data) {
        panic!("{violation}");
    }
});
