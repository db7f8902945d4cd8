//! Incremental framing of a protocol 3.0 message stream over a byte buffer.
//!
//! Every message after startup is a type byte, an `int32` length that counts itself, and a body.
//! The gateway forwards bytes and looks only at the headers; the few messages it inspects are
//! handed over whole, everything else may be passed through in pieces (a DataRow of a 500 MB
//! value, a CopyData) without ever being held in memory at once.

/// Bytes of the type byte plus the length word.
pub const HEADER_LEN: usize = 5;

/// What the scanner found at the front of the buffer it was given.
#[derive(Debug, PartialEq, Eq)]
pub enum Step<'a> {
    /// A message the caller asked to see whole.
    Whole {
        /// Message type byte.
        tag: u8,
        /// Body, without the type byte and length.
        body: &'a [u8],
    },
    /// The header of a message that is passed through in pieces.
    Streamed {
        /// Message type byte.
        tag: u8,
        /// Body length in bytes.
        body_len: usize,
    },
    /// More body bytes of the streamed message whose header came earlier.
    Body,
    /// The buffer ends inside a header or inside a message wanted whole.
    NeedMore,
}

/// A length word that cannot be right.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The length is below the 4 bytes it must count.
    #[error("invalid message length {len} for message type {:?}", char::from(*tag))]
    Malformed {
        /// Message type byte.
        tag: u8,
        /// The declared length.
        len: i64,
    },
    /// The length is above the configured limit.
    #[error("message of {len} bytes (type {:?}) exceeds the limit of {max} bytes", char::from(*tag))]
    TooLong {
        /// Message type byte.
        tag: u8,
        /// The declared length.
        len: usize,
        /// The limit in force.
        max: usize,
    },
}

/// Stateful scanner: remembers how much of a streamed message is still to come.
#[derive(Debug, Clone)]
pub struct FrameScanner {
    body_left: usize,
    max_len: usize,
    whole_up_to: usize,
}

impl FrameScanner {
    /// A scanner that rejects messages longer than `max_len` bytes (length word included).
    pub fn new(max_len: usize) -> Self {
        Self {
            body_left: 0,
            max_len,
            whole_up_to: 0,
        }
    }

    /// The same scanner, returning every message of at most `len` bytes (length word
    /// included) whole, whatever its type: a peer forwarded to is then never left inside one.
    pub fn whole_up_to(mut self, len: usize) -> Self {
        self.whole_up_to = len;
        self
    }

    /// Continues in the middle of a streamed message with `body_left` bytes still to come
    /// (after a stream was switched to another source mid-message).
    pub fn resume_body(&mut self, body_left: usize) {
        self.body_left = body_left;
    }

    /// Body bytes of the current streamed message still to come.
    pub fn body_left(&self) -> usize {
        self.body_left
    }

    /// Whether the scanner is at a message boundary.
    pub fn at_boundary(&self) -> bool {
        self.body_left == 0
    }

    /// Looks at the front of `buf` and returns what is there and how many bytes it covers.
    ///
    /// `whole(tag)` says which message types the caller must see complete. The returned count is
    /// what the caller may forward and must skip before the next call.
    pub fn next<'a>(
        &mut self,
        buf: &'a [u8],
        whole: impl Fn(u8) -> bool,
    ) -> Result<(Step<'a>, usize), FrameError> {
        if self.body_left > 0 {
            let n = self.body_left.min(buf.len());
            if n == 0 {
                return Ok((Step::NeedMore, 0));
            }
            self.body_left -= n;
            return Ok((Step::Body, n));
        }
        let Some(header) = buf.first_chunk::<HEADER_LEN>() else {
            return Ok((Step::NeedMore, 0));
        };
        let tag = header[0];
        let len = i32::from_be_bytes([header[1], header[2], header[3], header[4]]);
        if len < 4 {
            return Err(FrameError::Malformed {
                tag,
                len: len.into(),
            });
        }
        // Non-negative after the check above, so the cast is lossless.
        let len = len as usize;
        if len > self.max_len {
            return Err(FrameError::TooLong {
                tag,
                len,
                max: self.max_len,
            });
        }
        let body_len = len - 4;
        if len <= self.whole_up_to || whole(tag) {
            let end = HEADER_LEN + body_len;
            return Ok(match buf.get(HEADER_LEN..end) {
                Some(body) => (Step::Whole { tag, body }, end),
                None => (Step::NeedMore, 0),
            });
        }
        let available = (buf.len() - HEADER_LEN).min(body_len);
        self.body_left = body_len - available;
        Ok((Step::Streamed { tag, body_len }, HEADER_LEN + available))
    }

    /// Bytes still missing for the whole message at the front of `buf`, if one has begun.
    pub fn missing(buf: &[u8]) -> usize {
        match buf.first_chunk::<HEADER_LEN>() {
            Some(h) => {
                let len = i32::from_be_bytes([h[1], h[2], h[3], h[4]]).max(4) as usize;
                (1 + len).saturating_sub(buf.len())
            }
            None => HEADER_LEN - buf.len(),
        }
    }
}

/// The whole messages at the front of `buf`, each as its type byte and body, in order; ends
/// at one that is incomplete or whose length word is impossible.
pub fn messages(buf: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        let header = rest.first_chunk::<HEADER_LEN>()?;
        let len = i32::from_be_bytes([header[1], header[2], header[3], header[4]]);
        let end = HEADER_LEN + usize::try_from(len).ok()?.checked_sub(4)?;
        let body = rest.get(HEADER_LEN..end)?;
        let tag = header[0];
        rest = &rest[end..];
        Some((tag, body))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn messages_are_listed_up_to_an_incomplete_one() {
        let buf = [msg(b'Q', b"SELECT 1\0"), msg(b'S', b""), msg(b'X', b"")].concat();
        let tags: Vec<u8> = messages(&buf).map(|(t, _)| t).collect();
        assert_eq!(tags, b"QSX");
        assert_eq!(messages(&buf).next(), Some((b'Q', &b"SELECT 1\0"[..])));
        assert_eq!(messages(&buf[..buf.len() - 1]).count(), 2);
        assert_eq!(
            messages(b"Q\0\0\0\x02").count(),
            0,
            "a length below its own"
        );
    }

    #[test]
    fn whole_and_streamed_messages_across_split_reads() {
        let mut stream = msg(b'Z', b"I");
        stream.extend(msg(b'D', &[7u8; 10]));
        stream.extend(msg(b'Z', b"T"));
        // Feed the stream in every possible two-piece split and check the events are the same.
        for split in 0..stream.len() {
            let mut s = FrameScanner::new(1 << 20);
            let mut events = Vec::new();
            let mut buf: Vec<u8> = stream[..split].to_vec();
            let mut fed = split;
            loop {
                let (step, n) = s.next(&buf, |t| t == b'Z').unwrap();
                match step {
                    Step::NeedMore => {
                        if fed == stream.len() {
                            break;
                        }
                        buf.extend_from_slice(&stream[fed..]);
                        fed = stream.len();
                        continue;
                    }
                    Step::Whole { tag, body } => events.push(format!("{}{:?}", tag as char, body)),
                    Step::Streamed { tag, body_len } => {
                        events.push(format!("{}:{body_len}", tag as char))
                    }
                    Step::Body => {}
                }
                buf.drain(..n);
            }
            assert_eq!(events, ["Z[73]", "D:10", "Z[84]"], "split at {split}");
            assert!(s.at_boundary());
        }
    }

    #[test]
    fn small_messages_of_any_type_come_whole() {
        let mut stream = msg(b'D', &[1u8; 10]);
        stream.extend(msg(b'D', &[2u8; 100]));
        let mut s = FrameScanner::new(1 << 20).whole_up_to(20);
        // Not all of the first message yet: nothing to forward.
        assert_eq!(
            s.next(&stream[..8], |_| false).unwrap(),
            (Step::NeedMore, 0)
        );
        let (step, n) = s.next(&stream, |_| false).unwrap();
        assert_eq!(
            step,
            Step::Whole {
                tag: b'D',
                body: &[1u8; 10][..]
            }
        );
        // Over the bound: streamed as before.
        let (step, m) = s.next(&stream[n..n + 50], |_| false).unwrap();
        assert_eq!(
            (step, m),
            (
                Step::Streamed {
                    tag: b'D',
                    body_len: 100
                },
                50
            )
        );
        assert_eq!(s.body_left(), 55);
    }

    #[test]
    fn rejects_bad_lengths() {
        let mut s = FrameScanner::new(100);
        assert_eq!(
            s.next(&[b'Q', 0, 0, 0, 3], |_| true),
            Err(FrameError::Malformed { tag: b'Q', len: 3 })
        );
        assert_eq!(
            s.next(&[b'Q', 0xff, 0xff, 0xff, 0xff], |_| true),
            Err(FrameError::Malformed { tag: b'Q', len: -1 })
        );
        assert_eq!(
            s.next(&[b'Q', 0, 0, 1, 0], |_| false),
            Err(FrameError::TooLong {
                tag: b'Q',
                len: 256,
                max: 100
            })
        );
    }

    #[test]
    fn missing_counts_header_and_body() {
        assert_eq!(FrameScanner::missing(&[b'Q', 0]), 3);
        assert_eq!(FrameScanner::missing(&[b'Q', 0, 0, 0, 8, 1]), 3);
        assert_eq!(FrameScanner::missing(&msg(b'Q', b"abc")), 0);
    }
}
