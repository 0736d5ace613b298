//! Property tests of the ring buffer (`ring::Ring`) against a reference queue (`VecDeque<u8>`),
//! through the model in `tests/sim/ring_ref.rs` (shared with the `ring` fuzz target).
//!
//! After every operation: the length, emptiness and fullness agree with the queue; the readable
//! slice is the front of the queue; the writable slice is never larger than the free space and is
//! empty only when the ring is full; at most two rounds fill or drain the ring (a wrapped ring is
//! two runs); a drained ring offers its whole capacity at once; release gives storage back only
//! when empty. At the end, the bytes come out in the order they went in, each exactly once.

#[path = "sim/common.rs"]
mod common;
#[allow(dead_code)]
#[path = "sim/ring_ref.rs"]
mod ring_ref;
use common::{cases, fuzz_seeds};

use docker_socket_router::ring::{POOL_LIMIT, Ring, pooled_buffers};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::Config;
use ring_ref::{RingModel, RingOp};

fn op() -> impl Strategy<Value = RingOp> {
    prop_oneof![
        4 => (0usize..24).prop_map(|n| RingOp::Write { n }),
        4 => (0usize..24).prop_map(|n| RingOp::Read { n }),
        1 => Just(RingOp::Fill),
        1 => Just(RingOp::Drain),
        1 => Just(RingOp::Release),
    ]
}

proptest! {
    #![proptest_config(Config {
        cases: cases(2048),
        failure_persistence: None,
        ..Config::default()
    })]

    /// Any sequence of short fills, short drains, full rounds and releases, on small capacities
    /// (0 and 1 included) where wrap-around happens all the time.
    #[test]
    fn prop_ring_matches_queue(capacity in 0usize..18, ops in vec(op(), 0..80)) {
        ring_ref::check(capacity, &ops).map_err(TestCaseError::fail)?;
    }

    /// Ops decoded from raw bytes, exactly as the fuzz target decodes them.
    #[test]
    fn prop_ring_matches_queue_decoded(capacity in 0usize..70, bytes in vec(any::<u8>(), 0..160)) {
        let ops: Vec<RingOp> = bytes.chunks(2).map(|p| RingOp::decode(p[0], *p.get(1).unwrap_or(&0))).collect();
        ring_ref::check(capacity, &ops).map_err(TestCaseError::fail)?;
    }
}

proptest! {
    #![proptest_config(Config {
        cases: cases(256),
        failure_persistence: None,
        ..Config::default()
    })]

    /// Many rings in flight at once, each taking storage and giving it back in any order: the
    /// pool of released buffers never grows past its bound, and a reused buffer never shows old
    /// bytes (every model checks its bytes against its own queue).
    #[test]
    fn prop_ring_pool_stays_bounded(
        rings in vec((prop_oneof![Just(7usize), Just(16), Just(33)], vec(op(), 0..12)), 0..24),
    ) {
        let mut models: Vec<RingModel> = Vec::new();
        for (capacity, ops) in rings {
            let mut model = RingModel::new(capacity);
            for op in ops {
                model.apply(op).map_err(TestCaseError::fail)?;
            }
            models.push(model);
        }
        for mut model in models {
            model.apply(RingOp::Drain).map_err(TestCaseError::fail)?;
            model.apply(RingOp::Release).map_err(TestCaseError::fail)?;
            prop_assert!(pooled_buffers() <= POOL_LIMIT, "pool holds {}", pooled_buffers());
        }
    }
}

/// Wrap-around at every offset: for every capacity up to 12, every head offset and every fill
/// level, the readable slice is exactly the run up to the end of storage, the rest follows in a
/// second run, and the bytes come out in order.
#[test]
fn test_ring_wraps_at_every_offset() {
    for capacity in 1..=12usize {
        for offset in 0..capacity {
            for fill in 1..=capacity {
                let what = format!("capacity {capacity} offset {offset} fill {fill}");
                let mut model = RingModel::new(capacity);
                // Head at `offset` with one byte queued (an emptied ring would reset its head).
                model.apply(RingOp::Write { n: offset + 1 }).unwrap();
                model.apply(RingOp::Read { n: offset }).unwrap();
                // Queue `fill` bytes in all: wraps whenever offset + fill > capacity.
                for _ in 0..2 {
                    let n = fill - model.model.len();
                    model.apply(RingOp::Write { n }).unwrap();
                }
                assert_eq!(model.ring.len(), fill, "{what}");
                let first = model.ring.readable_slice().len();
                assert_eq!(first, fill.min(capacity - offset), "{what}");
                let free = model.ring.writable_slice().len();
                let tail = (offset + fill) % capacity;
                let want_free = if fill == capacity {
                    0
                } else if tail >= offset {
                    capacity - tail
                } else {
                    offset - tail
                };
                assert_eq!(free, want_free, "{what}");
                model
                    .apply(RingOp::Drain)
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
            }
        }
    }
}

/// Every head offset of a full ring: the first readable run ends at the end of storage, and the
/// second run holds the rest.
#[test]
fn test_ring_full_ring_two_runs_at_every_offset() {
    for capacity in 1..=9usize {
        for offset in 0..capacity {
            let mut ring = Ring::new(capacity);
            let slice = ring.writable_slice();
            assert_eq!(slice.len(), capacity);
            ring.commit(capacity);
            ring.consume(offset);
            // Refill the `offset` bytes just freed at the start of storage.
            let refill = ring.writable_slice().len();
            assert_eq!(refill, offset, "cap {capacity} offset {offset}");
            ring.commit(refill);
            assert!(ring.is_full());
            assert_eq!(ring.writable_slice().len(), 0);
            let first = ring.readable_slice().len();
            assert_eq!(first, capacity - offset, "cap {capacity} offset {offset}");
            ring.consume(first);
            assert_eq!(ring.readable_slice().len(), offset);
            ring.consume(offset);
            assert!(ring.is_empty());
        }
    }
}

#[test]
fn test_ring_capacity_zero_never_takes_a_byte() {
    let mut ring = Ring::new(0);
    assert!(ring.is_empty() && ring.is_full());
    assert!(ring.writable_slice().is_empty());
    ring.commit(5);
    assert_eq!(ring.len(), 0, "commit is clamped to the capacity");
    ring.consume(3);
    ring.release();
    assert!(ring.readable_slice().is_empty());
}

#[test]
fn test_ring_commit_and_consume_are_clamped() {
    let mut ring = Ring::new(4);
    let _ = ring.writable_slice();
    ring.commit(10);
    assert_eq!(ring.len(), 4);
    assert!(ring.is_full());
    ring.consume(99);
    assert!(ring.is_empty());
    assert_eq!(ring.writable_slice().len(), 4);
}

#[test]
fn test_ring_clear_drops_bytes_and_storage() {
    let mut model = RingModel::new(5);
    model.apply(RingOp::Write { n: 3 }).unwrap();
    model.ring.clear();
    assert!(model.ring.is_empty());
    assert!(!model.ring.is_allocated());
    assert!(model.ring.readable_slice().is_empty());
    assert_eq!(model.ring.writable_slice().len(), 5);
}

/// The `ring` fuzz seeds (and every regression seed a crash left there) pass.
#[test]
fn test_fuzz_seeds_ring() {
    for (name, bytes) in fuzz_seeds("ring") {
        if let Err(violation) = ring_ref::check_input(&bytes) {
            panic!("seed {name}: {violation}");
        }
    }
}
