//! A lenient, bounded reader of an HTTP request head, used only on the refusal path.
//!
//! Contract: bytes are fed in any chunking; the reader decides, without buffering the head,
//! whether the head is complete (an empty line, with `\r\n` or bare `\n` line ends), whether the
//! bytes cannot be HTTP at all (the request line does not start with a method token and a space),
//! or whether the head passed its size bound. Once decided, the status never changes.
//! It remembers only whether the method is `HEAD`, so the reply can leave out its body.

/// The longest method token we accept before deciding the bytes are not HTTP.
const MAX_METHOD_LEN: usize = 16;

/// What the reader knows so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadStatus {
    /// More bytes are needed.
    Incomplete,
    /// The blank line that ends the head was seen.
    Complete,
    /// The bytes do not start like an HTTP request.
    NotHttp,
    /// The head did not end within the size bound.
    TooLarge,
}

impl HeadStatus {
    pub fn is_decided(self) -> bool {
        self != HeadStatus::Incomplete
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Position {
    /// Before the request line; empty lines here are skipped, as HTTP servers do.
    Start,
    /// Inside the method token, with this many bytes seen and whether they spell `HEAD` so far.
    Method { len: usize, head_prefix: bool },
    /// Past the method; `line_len` counts the bytes of the current line, carriage returns aside.
    Lines { line_len: usize },
}

/// Incremental request-head reader with a size bound.
#[derive(Debug, Clone)]
pub struct HeadReader {
    limit: usize,
    seen: usize,
    position: Position,
    is_head_method: bool,
    status: HeadStatus,
}

impl HeadReader {
    /// A reader that gives up after `limit` bytes without a complete head.
    pub fn new(limit: usize) -> Self {
        HeadReader {
            limit,
            seen: 0,
            position: Position::Start,
            is_head_method: false,
            status: HeadStatus::Incomplete,
        }
    }

    pub fn status(&self) -> HeadStatus {
        self.status
    }

    /// Whether the request method is `HEAD` (a reply to it carries no body).
    pub fn is_head_method(&self) -> bool {
        self.is_head_method
    }

    /// How many bytes were fed before the status was decided (or so far).
    pub fn bytes_seen(&self) -> usize {
        self.seen
    }

    /// Feeds the next bytes; returns the status after them. Bytes after a decision are ignored.
    pub fn feed(&mut self, bytes: &[u8]) -> HeadStatus {
        for &byte in bytes {
            if self.status.is_decided() {
                break;
            }
            self.seen += 1;
            self.status = self.step(byte);
            if self.status == HeadStatus::Incomplete && self.seen >= self.limit {
                self.status = HeadStatus::TooLarge;
            }
        }
        self.status
    }

    fn step(&mut self, byte: u8) -> HeadStatus {
        match self.position {
            Position::Start => match byte {
                b'\r' | b'\n' => HeadStatus::Incomplete,
                b if is_token_byte(b) => {
                    self.position = Position::Method {
                        len: 1,
                        head_prefix: b == b'H',
                    };
                    HeadStatus::Incomplete
                }
                _ => HeadStatus::NotHttp,
            },
            Position::Method { len, head_prefix } => {
                if byte == b' ' {
                    self.is_head_method = head_prefix && len == 4;
                    self.position = Position::Lines { line_len: 1 };
                    HeadStatus::Incomplete
                } else if is_token_byte(byte) && len < MAX_METHOD_LEN {
                    let still_head = head_prefix && b"HEAD".get(len) == Some(&byte);
                    self.position = Position::Method {
                        len: len + 1,
                        head_prefix: still_head,
                    };
                    HeadStatus::Incomplete
                } else {
                    HeadStatus::NotHttp
                }
            }
            Position::Lines { line_len } => match byte {
                b'\n' if line_len == 0 => HeadStatus::Complete,
                b'\n' => {
                    self.position = Position::Lines { line_len: 0 };
                    HeadStatus::Incomplete
                }
                b'\r' => HeadStatus::Incomplete,
                _ => {
                    self.position = Position::Lines {
                        line_len: line_len + 1,
                    };
                    HeadStatus::Incomplete
                }
            },
        }
    }
}

/// RFC 9110 `tchar`: the bytes a method token may hold.
fn is_token_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(input: &[u8]) -> HeadReader {
        let mut reader = HeadReader::new(1024);
        reader.feed(input);
        reader
    }

    #[test]
    fn test_head_complete_with_crlf() {
        let reader = read_all(b"GET /_ping HTTP/1.1\r\nHost: docker\r\n\r\nbody");
        assert_eq!(reader.status(), HeadStatus::Complete);
        assert!(!reader.is_head_method());
        assert_eq!(reader.bytes_seen(), 37);
    }

    #[test]
    fn test_head_complete_with_bare_lf_and_http10() {
        let reader = read_all(b"HEAD /_ping HTTP/1.0\n\n");
        assert_eq!(reader.status(), HeadStatus::Complete);
        assert!(reader.is_head_method());
    }

    #[test]
    fn test_head_byte_by_byte_equals_whole() {
        let input = b"HEAD /v1.41/info HTTP/1.1\r\nA: b\r\n\r\n";
        let mut reader = HeadReader::new(1024);
        for byte in input {
            reader.feed(std::slice::from_ref(byte));
        }
        assert_eq!(reader.status(), HeadStatus::Complete);
        assert!(reader.is_head_method());
    }

    #[test]
    fn test_head_methods_that_only_start_like_head() {
        assert!(!read_all(b"HEADX / HTTP/1.1\r\n\r\n").is_head_method());
        assert!(!read_all(b"HEA / HTTP/1.1\r\n\r\n").is_head_method());
        assert!(!read_all(b"GET / HTTP/1.1\r\n\r\n").is_head_method());
    }

    #[test]
    fn test_head_leading_empty_lines_are_skipped() {
        let reader = read_all(b"\r\n\r\nGET / HTTP/1.1\r\n\r\n");
        assert_eq!(reader.status(), HeadStatus::Complete);
    }

    #[test]
    fn test_head_garbage_is_not_http() {
        assert_eq!(read_all(b"\x16\x03\x01").status(), HeadStatus::NotHttp);
        assert_eq!(read_all(b"{\"json\": 1}").status(), HeadStatus::NotHttp);
        assert_eq!(
            read_all(b"AVERYLONGMETHODNAMEXX / ").status(),
            HeadStatus::NotHttp
        );
    }

    #[test]
    fn test_head_too_large() {
        let mut reader = HeadReader::new(32);
        let status = reader.feed(b"GET / HTTP/1.1\r\nX-Long: aaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n");
        assert_eq!(status, HeadStatus::TooLarge);
        assert_eq!(reader.bytes_seen(), 32);
    }

    #[test]
    fn test_head_incomplete_until_blank_line() {
        let mut reader = HeadReader::new(1024);
        assert_eq!(
            reader.feed(b"GET / HTTP/1.1\r\nHost: x\r\n"),
            HeadStatus::Incomplete
        );
        assert_eq!(reader.feed(b"\r"), HeadStatus::Incomplete);
        assert_eq!(reader.feed(b"\n"), HeadStatus::Complete);
    }
}
