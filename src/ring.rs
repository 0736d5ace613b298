//! A fixed-capacity byte ring, one per pipe direction.
//!
//! Contract:
//! - `len() <= capacity()` always; bytes come out in the order they went in, exactly once.
//! - Storage is allocated on the first write and can be given back with [`Ring::release`]
//!   while the ring is empty, so an idle connection holds no buffer memory.
//! - The producer asks for [`Ring::writable_slice`] (one contiguous free region), fills a prefix
//!   and calls [`Ring::commit`]; the consumer reads [`Ring::readable_slice`] (one contiguous run of
//!   queued bytes) and calls [`Ring::consume`]. A wrapped ring needs two rounds of each; when the
//!   ring becomes empty its offsets reset, so a drained ring offers its whole capacity at once.
//! - Released storage goes to a small per-thread pool (at most [`POOL_LIMIT`] buffers) and is
//!   reused by the next ring that needs one of the same size, so request/response traffic does
//!   not allocate and zero a buffer per burst. The pool only caches memory: no behaviour depends
//!   on it, and it bounds the idle memory to `POOL_LIMIT × buffer size`.
//! - Capacity 0 is allowed: it never accepts a byte (useful only to tests).

use std::cell::RefCell;

/// The most released buffers kept for reuse (per thread; the router has one).
pub const POOL_LIMIT: usize = 8;

thread_local! {
    static POOL: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

/// A buffer of `capacity` bytes, from the pool when one of that size is there.
fn take_storage(capacity: usize) -> Box<[u8]> {
    let pooled = POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        let index = pool.iter().position(|buf| buf.len() == capacity)?;
        Some(pool.swap_remove(index))
    });
    pooled.unwrap_or_else(|| vec![0u8; capacity].into_boxed_slice())
}

/// Keeps a released buffer for reuse if the pool has room; frees it otherwise.
fn give_back_storage(storage: Box<[u8]>) {
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.len() < POOL_LIMIT {
            pool.push(storage);
        }
    });
}

/// How many released buffers the pool holds now.
pub fn pooled_buffers() -> usize {
    POOL.with(|pool| pool.borrow().len())
}

/// A fixed-capacity FIFO of bytes with lazily allocated storage.
#[derive(Debug)]
pub struct Ring {
    storage: Option<Box<[u8]>>,
    capacity: usize,
    /// Index of the oldest queued byte.
    head: usize,
    len: usize,
}

impl Ring {
    /// A ring that will hold at most `capacity` bytes. Allocates nothing yet.
    pub fn new(capacity: usize) -> Self {
        Ring {
            storage: None,
            capacity,
            head: 0,
            len: 0,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn is_full(&self) -> bool {
        self.len == self.capacity
    }

    /// Whether storage is currently allocated.
    pub fn is_allocated(&self) -> bool {
        self.storage.is_some()
    }

    /// The largest contiguous free region, allocating storage if needed.
    /// Empty when the ring is full.
    pub fn writable_slice(&mut self) -> &mut [u8] {
        if self.is_full() {
            return &mut [];
        }
        let capacity = self.capacity;
        let tail = (self.head + self.len) % capacity;
        // Free space runs from the tail to the end of storage, or up to the head once wrapped.
        let end = if tail >= self.head {
            capacity
        } else {
            self.head
        };
        let storage = self.storage.get_or_insert_with(|| take_storage(capacity));
        storage.get_mut(tail..end).unwrap_or(&mut [])
    }

    /// Marks the first `n` bytes of the last [`Ring::writable_slice`] as filled.
    /// Clamped to the free space, so a wrong `n` cannot corrupt the ring.
    pub fn commit(&mut self, n: usize) {
        self.len = (self.len + n).min(self.capacity);
    }

    /// The oldest contiguous run of queued bytes. Empty when the ring is empty.
    pub fn readable_slice(&self) -> &[u8] {
        let Some(storage) = self.storage.as_deref() else {
            return &[];
        };
        let end = (self.head + self.len).min(self.capacity);
        storage.get(self.head..end).unwrap_or(&[])
    }

    /// Drops the first `n` queued bytes (clamped to the queued length).
    pub fn consume(&mut self, n: usize) {
        let n = n.min(self.len);
        self.len -= n;
        if self.len == 0 {
            self.head = 0;
        } else {
            self.head = (self.head + n) % self.capacity;
        }
    }

    /// Drops every queued byte and gives the storage back.
    pub fn clear(&mut self) {
        self.len = 0;
        self.release();
    }

    /// Gives the storage back (to the pool, or the allocator) if nothing is queued.
    pub fn release(&mut self) {
        if self.len == 0 {
            if let Some(storage) = self.storage.take() {
                give_back_storage(storage);
            }
            self.head = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(ring: &mut Ring, bytes: &[u8]) -> usize {
        let mut done = 0;
        while done < bytes.len() {
            let slice = ring.writable_slice();
            if slice.is_empty() {
                break;
            }
            let n = slice.len().min(bytes.len() - done);
            slice[..n].copy_from_slice(&bytes[done..done + n]);
            ring.commit(n);
            done += n;
        }
        done
    }

    fn pop(ring: &mut Ring, max: usize) -> Vec<u8> {
        let mut out = Vec::new();
        while out.len() < max {
            let slice = ring.readable_slice();
            if slice.is_empty() {
                break;
            }
            let n = slice.len().min(max - out.len());
            out.extend_from_slice(&slice[..n]);
            ring.consume(n);
        }
        out
    }

    #[test]
    fn test_ring_allocates_lazily_and_releases_when_empty() {
        let mut ring = Ring::new(8);
        assert!(!ring.is_allocated());
        assert_eq!(push(&mut ring, b"abc"), 3);
        assert!(ring.is_allocated());
        ring.release();
        assert!(ring.is_allocated(), "release must keep queued bytes");
        assert_eq!(pop(&mut ring, 10), b"abc");
        ring.release();
        assert!(!ring.is_allocated());
    }

    #[test]
    fn test_ring_reuses_released_buffers_up_to_the_pool_limit() {
        let mut rings: Vec<Ring> = (0..POOL_LIMIT + 2).map(|_| Ring::new(64)).collect();
        for ring in &mut rings {
            push(ring, b"x");
            pop(ring, 1);
        }
        let before = pooled_buffers();
        for ring in &mut rings {
            ring.release();
        }
        assert_eq!(pooled_buffers(), POOL_LIMIT.max(before));
        let mut again = Ring::new(64);
        push(&mut again, b"reused");
        assert_eq!(pooled_buffers(), POOL_LIMIT - 1);
        assert_eq!(
            pop(&mut again, 10),
            b"reused",
            "a reused buffer holds only new bytes"
        );
        let mut other_size = Ring::new(32);
        push(&mut other_size, b"y");
        assert_eq!(
            pooled_buffers(),
            POOL_LIMIT - 1,
            "only buffers of the same size are reused"
        );
    }

    #[test]
    fn test_ring_wraps_and_keeps_order() {
        let mut ring = Ring::new(5);
        assert_eq!(push(&mut ring, b"abcd"), 4);
        assert_eq!(pop(&mut ring, 3), b"abc");
        assert_eq!(push(&mut ring, b"efgh"), 4);
        assert!(ring.is_full());
        assert_eq!(push(&mut ring, b"x"), 0);
        assert_eq!(pop(&mut ring, 10), b"defgh");
        assert!(ring.is_empty());
    }

    #[test]
    fn test_ring_capacity_zero_and_one() {
        let mut zero = Ring::new(0);
        assert!(zero.is_full() && zero.is_empty());
        assert_eq!(push(&mut zero, b"a"), 0);
        assert!(zero.readable_slice().is_empty());
        let mut one = Ring::new(1);
        assert_eq!(push(&mut one, b"ab"), 1);
        assert_eq!(pop(&mut one, 5), b"a");
        assert_eq!(push(&mut one, b"b"), 1);
        assert_eq!(pop(&mut one, 5), b"b");
    }

    #[test]
    fn test_ring_drained_ring_offers_whole_capacity() {
        let mut ring = Ring::new(4);
        push(&mut ring, b"abc");
        pop(&mut ring, 3);
        assert_eq!(ring.writable_slice().len(), 4);
    }
}
