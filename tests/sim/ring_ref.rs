//! The ring buffer (`ring::Ring`) against a reference queue (`VecDeque<u8>`).

use std::collections::VecDeque;

use docker_socket_router::ring::{POOL_LIMIT, Ring, pooled_buffers};

/// One thing a producer or consumer does to a ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingOp {
    /// Fill up to `n` bytes of the writable slice (a short fill, as a short `read` would) and
    /// commit them. The bytes written are a running counter, so order is visible.
    Write { n: usize },
    /// Consume up to `n` bytes of the readable slice (a short `write`).
    Read { n: usize },
    /// Fill the ring completely, in as many rounds as it takes.
    Fill,
    /// Drain the ring completely.
    Drain,
    /// Give the storage back if empty.
    Release,
}

impl RingOp {
    /// Decodes one op from two bytes (for the fuzz target and byte-driven tests).
    pub fn decode(tag: u8, arg: u8) -> RingOp {
        let n = usize::from(arg);
        match tag % 8 {
            0..=2 => RingOp::Write { n },
            3..=5 => RingOp::Read { n },
            6 => match arg % 3 {
                0 => RingOp::Fill,
                1 => RingOp::Drain,
                _ => RingOp::Release,
            },
            _ => RingOp::Release,
        }
    }
}

/// A ring and its reference queue, checked against each other after every op.
pub struct RingModel {
    pub ring: Ring,
    pub model: VecDeque<u8>,
    capacity: usize,
    next: u8,
}

impl RingModel {
    pub fn new(capacity: usize) -> Self {
        RingModel {
            ring: Ring::new(capacity),
            model: VecDeque::new(),
            capacity,
            next: 0,
        }
    }

    /// One round of the producer: at most `n` bytes into the writable slice.
    fn write_round(&mut self, n: usize) -> Result<usize, String> {
        let free = self.capacity - self.model.len();
        let slice = self.ring.writable_slice();
        if slice.len() > free {
            return Err(format!(
                "writable slice {} > free space {free}",
                slice.len()
            ));
        }
        if slice.is_empty() != (free == 0) {
            return Err(format!(
                "writable slice empty={} with {free} bytes free",
                slice.is_empty()
            ));
        }
        let n = n.min(slice.len());
        for byte in slice.iter_mut().take(n) {
            *byte = self.next;
            self.model.push_back(self.next);
            self.next = self.next.wrapping_add(1);
        }
        self.ring.commit(n);
        Ok(n)
    }

    /// One round of the consumer: at most `n` bytes from the readable slice.
    fn read_round(&mut self, n: usize) -> Result<usize, String> {
        let slice = self.ring.readable_slice();
        if slice.len() > self.model.len() {
            return Err(format!(
                "readable slice {} > queued {}",
                slice.len(),
                self.model.len()
            ));
        }
        if slice.is_empty() != self.model.is_empty() {
            return Err(format!(
                "readable slice empty={} with {} queued",
                slice.is_empty(),
                self.model.len()
            ));
        }
        let n = n.min(slice.len());
        for (i, &byte) in slice.iter().enumerate() {
            if self.model.get(i) != Some(&byte) {
                return Err(format!(
                    "readable slice byte {i} is {byte}, queue has {:?}",
                    self.model.get(i)
                ));
            }
        }
        self.ring.consume(n);
        self.model.drain(..n);
        Ok(n)
    }

    pub fn apply(&mut self, op: RingOp) -> Result<(), String> {
        match op {
            RingOp::Write { n } => {
                self.write_round(n)?;
            }
            RingOp::Read { n } => {
                self.read_round(n)?;
            }
            RingOp::Fill => {
                // The free space is at most two contiguous runs.
                for _ in 0..2 {
                    self.write_round(usize::MAX)?;
                }
                if !self.ring.is_full() {
                    return Err("two write rounds did not fill the ring".into());
                }
            }
            RingOp::Drain => {
                for _ in 0..2 {
                    self.read_round(usize::MAX)?;
                }
                if !self.ring.is_empty() {
                    return Err("two read rounds did not drain the ring".into());
                }
                // A drained ring offers its whole capacity at once.
                let whole = self.ring.writable_slice().len();
                if whole != self.capacity {
                    return Err(format!(
                        "drained ring offers {whole} of {} bytes",
                        self.capacity
                    ));
                }
            }
            RingOp::Release => {
                let was_empty = self.model.is_empty();
                self.ring.release();
                if was_empty && self.ring.is_allocated() {
                    return Err("release of an empty ring kept its storage".into());
                }
            }
        }
        self.check()
    }

    pub fn check(&self) -> Result<(), String> {
        let ring = &self.ring;
        if ring.capacity() != self.capacity {
            return Err(format!("capacity changed to {}", ring.capacity()));
        }
        if ring.len() != self.model.len() || ring.len() > ring.capacity() {
            return Err(format!(
                "len {} but the queue holds {} (capacity {})",
                ring.len(),
                self.model.len(),
                self.capacity
            ));
        }
        if ring.is_empty() != self.model.is_empty()
            || ring.is_full() != (self.model.len() == self.capacity)
        {
            return Err(format!(
                "is_empty {} is_full {} with {} of {} queued",
                ring.is_empty(),
                ring.is_full(),
                self.model.len(),
                self.capacity
            ));
        }
        if !self.model.is_empty() && !ring.is_allocated() {
            return Err("bytes queued without storage".into());
        }
        // Released buffers are cached, but never more than the pool's bound.
        if pooled_buffers() > POOL_LIMIT {
            return Err(format!(
                "the buffer pool holds {} > {POOL_LIMIT}",
                pooled_buffers()
            ));
        }
        let front = ring.readable_slice();
        if front.is_empty() != self.model.is_empty()
            || !front.iter().zip(self.model.iter()).all(|(a, b)| a == b)
        {
            return Err(format!(
                "readable slice {front:?} is not the front of {:?}",
                self.model
            ));
        }
        Ok(())
    }
}

/// Runs `ops` on a ring of `capacity`, then drains it and compares the whole byte stream.
pub fn check(capacity: usize, ops: &[RingOp]) -> Result<(), String> {
    let mut model = RingModel::new(capacity);
    for (i, &op) in ops.iter().enumerate() {
        model
            .apply(op)
            .map_err(|e| format!("capacity {capacity}, op {i} {op:?}: {e}"))?;
    }
    model
        .apply(RingOp::Drain)
        .map_err(|e| format!("capacity {capacity}, final drain: {e}"))
}

/// Decodes a fuzz input and checks it: capacity (1 byte, 0 to 79), then two bytes per op.
pub fn check_input(data: &[u8]) -> Result<(), String> {
    let Some((&capacity, rest)) = data.split_first() else {
        return Ok(());
    };
    let ops: Vec<RingOp> = rest
        .chunks(2)
        .map(|pair| RingOp::decode(pair[0], pair.get(1).copied().unwrap_or(0)))
        .collect();
    check(usize::from(capacity % 80), &ops)
}
