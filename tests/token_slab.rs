//! Tokens and the slab: events for freed or reused slots are ignored, never acted on.
//!
//! The daemon's dispatch (`Daemon::on_conn_event`) needs a real `Poll`, so this drives the same
//! three checks it makes (`ConnToken::decode`, the slab lookup, `ConnToken::matches`) against a
//! reference: a token acts only on the connection it was minted for. A random history of
//! accepts (slab insertions, which reuse freed slots), closes (removals) and poll batches (tokens
//! minted earlier, some for connections that have since gone and whose slot was reused in the
//! same batch) is replayed; every event must reach exactly its own connection or nothing.

// Only the case count is used here, not the seed loader.
#[allow(dead_code)]
#[path = "sim/common.rs"]
mod common;
use common::cases;
use docker_socket_router::conn::machine::Side;
use docker_socket_router::token::{ConnToken, LISTENER, MAX_SLOT, SIGNALS};
use mio::Token;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::Config;
use slab::Slab;

/// A live connection as the slab holds it.
#[derive(Debug, Clone, Copy)]
struct Conn {
    id: u64,
}

/// The real dispatch decision: which slot, and which side, an event acts on.
fn dispatch(conns: &Slab<Conn>, token: Token) -> Option<(usize, Side)> {
    let decoded = ConnToken::decode(token)?;
    let conn = conns.get(decoded.slot)?;
    decoded
        .matches(conn.id)
        .then_some((decoded.slot, decoded.side))
}

#[derive(Debug, Clone)]
enum Action {
    /// Accept a connection (the slab reuses the lowest freed slot first, as slab does).
    Accept,
    /// Close the `n`-th live connection.
    Close(usize),
    /// Mint an event for the `n`-th live connection's side, into the pending batch.
    Event(usize, bool),
    /// Deliver the `n`-th pending event.
    Deliver(usize),
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        3 => Just(Action::Accept),
        2 => any::<usize>().prop_map(Action::Close),
        4 => (any::<usize>(), any::<bool>()).prop_map(|(n, up)| Action::Event(n, up)),
        4 => any::<usize>().prop_map(Action::Deliver),
    ]
}

proptest! {
    #![proptest_config(Config {
        cases: cases(1024),
        failure_persistence: None,
        ..Config::default()
    })]

    /// Stale events (their connection closed, its slot maybe reused) are ignored; live ones reach
    /// exactly their connection and side.
    #[test]
    fn prop_stale_events_are_ignored(
        first_id in prop_oneof![Just(0u64), any::<u64>().prop_map(|n| n >> 20), Just((1 << 42) - 3)],
        actions in vec(action(), 0..200),
    ) {
        let mut conns: Slab<Conn> = Slab::new();
        let mut next_id = first_id;
        // Minted events: the token, and the connection it was minted for (slot, side, id).
        let mut pending: Vec<(Token, usize, Side, u64)> = Vec::new();
        for action in actions {
            match action {
                Action::Accept => {
                    let slot = conns.insert(Conn { id: next_id });
                    next_id += 1;
                    prop_assert!(slot <= MAX_SLOT);
                }
                Action::Close(n) => {
                    let live: Vec<usize> = conns.iter().map(|(slot, _)| slot).collect();
                    if !live.is_empty() {
                        conns.remove(live[n % live.len()]);
                    }
                }
                Action::Event(n, up) => {
                    let live: Vec<(usize, u64)> = conns.iter().map(|(s, c)| (s, c.id)).collect();
                    if !live.is_empty() {
                        let (slot, id) = live[n % live.len()];
                        let side = if up { Side::Upstream } else { Side::Client };
                        let token = ConnToken::new(slot, side, id).encode();
                        prop_assert!(token != LISTENER && token != SIGNALS);
                        pending.push((token, slot, side, id));
                    }
                }
                Action::Deliver(n) => {
                    if pending.is_empty() {
                        continue;
                    }
                    let (token, slot, side, id) = pending.remove(n % pending.len());
                    let acted = dispatch(&conns, token);
                    let owner_alive = conns.get(slot).is_some_and(|c| c.id == id);
                    let want = owner_alive.then_some((slot, side));
                    prop_assert_eq!(
                        acted, want,
                        "token {:?} minted for slot {} side {:?} id {}; slab now {:?}",
                        token, slot, side, id, conns.get(slot)
                    );
                }
            }
            // Tokens of live connections never collide with each other or the reserved ones.
            let mut seen = std::collections::HashSet::new();
            for (slot, conn) in &conns {
                for side in [Side::Client, Side::Upstream] {
                    let token = ConnToken::new(slot, side, conn.id).encode();
                    prop_assert!(seen.insert(token), "two live sockets share {:?}", token);
                    prop_assert!(token != LISTENER && token != SIGNALS);
                    prop_assert_eq!(dispatch(&conns, token), Some((slot, side)));
                }
            }
        }
    }

    /// Encoding round-trips, and decoding is canonical: a token that decodes re-encodes to itself.
    #[test]
    fn prop_token_round_trip(slot in 0..=MAX_SLOT, up in any::<bool>(), id in any::<u64>(), raw in any::<usize>()) {
        let side = if up { Side::Upstream } else { Side::Client };
        let token = ConnToken::new(slot, side, id);
        let decoded = ConnToken::decode(token.encode());
        prop_assert_eq!(decoded, Some(token));
        prop_assert!(token.matches(id));
        prop_assert_eq!(token.slot, slot);
        prop_assert_eq!(token.side, side);
        if let Some(any) = ConnToken::decode(Token(raw)) {
            prop_assert_eq!(any.encode(), Token(raw));
        }
    }

    /// A connection id differs from its slot's previous occupant's by less than 2^42 (ids count
    /// up by one per accept), so the generation never aliases.
    #[test]
    fn prop_generation_tells_neighbours_apart(id in any::<u64>(), gap in 1u64..(1 << 42), slot in 0..=MAX_SLOT) {
        let old = ConnToken::new(slot, Side::Client, id);
        prop_assert!(!old.matches(id.wrapping_add(gap)));
    }
}

#[test]
fn test_reserved_tokens_never_decode() {
    assert_eq!(ConnToken::decode(LISTENER), None);
    assert_eq!(ConnToken::decode(SIGNALS), None);
}

/// The slot a token carries is masked to `MAX_SLOT`: a slot past it would alias another slot.
/// The connection limit keeps slots far below it (`--max-connections` is at most 2^19).
#[test]
fn test_slots_up_to_the_connection_limit_fit_a_token() {
    let limit = 1usize << 19;
    assert!(limit <= MAX_SLOT);
    let token = ConnToken::new(limit, Side::Upstream, 7).encode();
    assert_eq!(ConnToken::decode(token).map(|t| t.slot), Some(limit));
}
