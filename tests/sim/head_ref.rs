//! A reference for the refusal path's request-head reader (`head::HeadReader`).
//!
//! The real reader is incremental; this one looks at the whole input at once and says where the
//! decision falls, so the two can be compared on any input and any chunking.

use docker_socket_router::head::{HeadReader, HeadStatus};

/// What the reference decides for an input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expected {
    pub status: HeadStatus,
    /// Bytes the reader must have consumed: up to and including the deciding byte.
    pub seen: usize,
    pub is_head: bool,
}

fn is_tchar(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

/// The longest method token accepted.
const MAX_METHOD: usize = 16;

/// Decides `input` with a size bound of `limit` bytes.
///
/// Rules (the `head.rs` contract, restated): leading CR/LF bytes are skipped; then a method of 1
/// to 16 token bytes and a space, or the bytes are not HTTP; the head is complete at the first
/// `\n` that ends a line holding nothing but `\r` bytes; a head still undecided after `limit`
/// bytes (at least one) is too large.
pub fn expect(input: &[u8], limit: usize) -> Expected {
    let limit = limit.max(1);
    // Index of the deciding byte, and the status it decides.
    let mut decision: Option<(usize, HeadStatus)> = None;
    let mut space: Option<usize> = None;
    let start = input
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(input.len());
    if start < input.len() {
        let method = input[start..]
            .iter()
            .take(MAX_METHOD + 1)
            .take_while(|&&b| is_tchar(b))
            .count();
        let after = start + method;
        if method == 0 {
            decision = Some((start, HeadStatus::NotHttp));
        } else if method > MAX_METHOD {
            decision = Some((start + MAX_METHOD, HeadStatus::NotHttp));
        } else if after < input.len() {
            if input[after] == b' ' {
                space = Some(after);
            } else {
                decision = Some((after, HeadStatus::NotHttp));
            }
        }
    }
    if let Some(sp) = space {
        // The request line is the first line; find the first line made only of `\r` bytes.
        let mut line_has_text = true;
        for (i, &b) in input.iter().enumerate().skip(sp + 1) {
            match b {
                b'\n' if !line_has_text => {
                    decision = Some((i, HeadStatus::Complete));
                    break;
                }
                b'\n' => line_has_text = false,
                b'\r' => {}
                _ => line_has_text = true,
            }
        }
    }
    let (status, seen) = match decision {
        Some((index, status)) if index < limit => (status, index + 1),
        _ if input.len() >= limit => (HeadStatus::TooLarge, limit),
        _ => (HeadStatus::Incomplete, input.len()),
    };
    let is_head = space.is_some_and(|sp| sp < seen && &input[start..sp] == b"HEAD");
    Expected {
        status,
        seen,
        is_head,
    }
}

/// Feeds `input` to the real reader in the chunks `cuts` describes and compares every
/// observable with the reference: after each chunk, and once more after extra bytes.
pub fn check(input: &[u8], limit: usize, cuts: &[u8]) -> Result<(), String> {
    let want = expect(input, limit);
    let mut reader = HeadReader::new(limit);
    let mut fed = 0;
    let mut cut = cuts.iter().cycle();
    while fed < input.len() {
        let size = if cuts.is_empty() {
            input.len()
        } else {
            usize::from(*cut.next().unwrap_or(&0)) + 1
        };
        let end = (fed + size).min(input.len());
        let status = reader.feed(&input[fed..end]);
        fed = end;
        let partial = expect(&input[..fed], limit);
        if status != partial.status || reader.status() != partial.status {
            return Err(format!(
                "after {fed} bytes (limit {limit}): status {status:?}, reference {partial:?}"
            ));
        }
        if reader.bytes_seen() != partial.seen || reader.is_head_method() != partial.is_head {
            return Err(format!(
                "after {fed} bytes (limit {limit}): seen {} head {}, reference {partial:?}",
                reader.bytes_seen(),
                reader.is_head_method()
            ));
        }
    }
    if reader.status() != want.status
        || reader.bytes_seen() != want.seen
        || reader.is_head_method() != want.is_head
    {
        return Err(format!(
            "whole input (limit {limit}): status {:?} seen {} head {}, reference {want:?}",
            reader.status(),
            reader.bytes_seen(),
            reader.is_head_method()
        ));
    }
    if reader.bytes_seen() > limit.max(1) {
        return Err(format!(
            "read {} bytes past the bound {limit}",
            reader.bytes_seen()
        ));
    }
    // A decision never changes, and a decided reader takes no more bytes.
    if want.status.is_decided() {
        let before = (
            reader.status(),
            reader.bytes_seen(),
            reader.is_head_method(),
        );
        reader.feed(b"\r\n\r\nGET / HTTP/1.1\r\n\r\n\xff");
        let after = (
            reader.status(),
            reader.bytes_seen(),
            reader.is_head_method(),
        );
        if before != after {
            return Err(format!("a decided reader changed: {before:?} -> {after:?}"));
        }
    }
    Ok(())
}

/// Decodes a fuzz input and checks it: limit (2 bytes; mostly below 96, sometimes the real
/// 16 KiB), number of chunk sizes (1 byte, up to 15), the chunk sizes, then the bytes.
pub fn check_input(data: &[u8]) -> Result<(), String> {
    if data.len() < 3 {
        return Ok(());
    }
    let raw_limit = usize::from(u16::from_le_bytes([data[0], data[1]]));
    let limit = if raw_limit >= 0xf000 {
        16 * 1024
    } else {
        raw_limit % 96
    };
    let cuts_len = usize::from(data[2] % 16).min(data.len() - 3);
    let (cuts, input) = data[3..].split_at(cuts_len);
    check(input, limit, cuts)
        .map_err(|violation| format!("{violation}\ninput: {:?}", String::from_utf8_lossy(input)))
}
