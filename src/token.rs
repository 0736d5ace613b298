//! Poll tokens: which connection, which side, which generation.
//!
//! Contract: a connection's two sockets get tokens that encode its slab slot, the side and the
//! low bits of the connection's generation (its id). An event whose slot is vacant, or whose
//! generation differs from the slot's current connection, is stale and must be ignored. Two
//! reserved tokens at the top of the range name the listener and the signal descriptor; no
//! connection token can collide with them.

use crate::conn::machine::Side;
use mio::Token;

pub const LISTENER: Token = Token(usize::MAX);
pub const SIGNALS: Token = Token(usize::MAX - 1);

/// Bits for the slot index: far above any connection limit.
const SLOT_BITS: u32 = 20;
/// The largest slot index a token can carry.
pub const MAX_SLOT: usize = (1 << SLOT_BITS) - 1;
/// Bits of the generation kept in a token; the top bit stays clear, so no connection token can
/// equal a reserved one (on 32-bit targets too).
const GENERATION_BITS: u32 = usize::BITS - SLOT_BITS - 2;
const GENERATION_MASK: u64 = (1 << GENERATION_BITS) - 1;

/// What a connection token says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnToken {
    pub slot: usize,
    pub side: Side,
    /// The low bits of the connection id.
    pub generation: usize,
}

impl ConnToken {
    pub fn new(slot: usize, side: Side, id: u64) -> Self {
        ConnToken {
            slot: slot & MAX_SLOT,
            side,
            generation: (id & GENERATION_MASK) as usize,
        }
    }

    /// Whether this token was made for the connection with this id.
    pub fn matches(&self, id: u64) -> bool {
        self.generation as u64 == id & GENERATION_MASK
    }

    /// Encodes as `generation << (SLOT_BITS + 1) | slot << 1 | side`.
    pub fn encode(self) -> Token {
        let side = match self.side {
            Side::Client => 0,
            Side::Upstream => 1,
        };
        Token((self.generation << (SLOT_BITS + 1)) | ((self.slot & MAX_SLOT) << 1) | side)
    }

    /// Decodes a token; `None` for the reserved tokens and anything no connection could have.
    pub fn decode(token: Token) -> Option<ConnToken> {
        let value = token.0;
        if value >> (SLOT_BITS + 1 + GENERATION_BITS) != 0 {
            return None;
        }
        let side = if value & 1 == 0 {
            Side::Client
        } else {
            Side::Upstream
        };
        Some(ConnToken {
            slot: (value >> 1) & MAX_SLOT,
            side,
            generation: value >> (SLOT_BITS + 1),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_token_round_trip() {
        for (slot, side, id) in [
            (0, Side::Client, 0),
            (7, Side::Upstream, 1),
            (MAX_SLOT, Side::Upstream, u64::MAX),
            (12345, Side::Client, 1 << 40),
        ] {
            let token = ConnToken::new(slot, side, id);
            let decoded = ConnToken::decode(token.encode()).unwrap();
            assert_eq!(decoded, token);
            assert!(decoded.matches(id));
            assert!(!decoded.matches(id.wrapping_add(1)));
        }
    }

    #[test]
    fn test_token_reserved_never_decode() {
        assert_eq!(ConnToken::decode(LISTENER), None);
        assert_eq!(ConnToken::decode(SIGNALS), None);
        let top = ConnToken::new(MAX_SLOT, Side::Upstream, GENERATION_MASK).encode();
        assert!(ConnToken::decode(top).is_some());
        assert!(top != LISTENER && top != SIGNALS);
    }
}
