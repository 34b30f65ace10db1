//! Framing of the control connection: a `u32` little-endian body length, then a JSON body.
//!
//! The length is checked against a hard maximum ([`MAX_FRAME_SIZE`]) as soon as its four bytes
//! are in, before any of the body is buffered or allocated: the other side is untrusted (a guest
//! is hostile from its first instruction), and a frame header claiming 4 GiB must cost nothing.
//!
//! Two ways to read:
//! - [`FrameDecoder`] for event loops on non-blocking sockets: push bytes as they come (or let
//!   it read with [`FrameDecoder::read_from`]), take complete frames out with
//!   [`FrameDecoder::next_frame`] / [`FrameDecoder::next_message`].
//! - [`read_frame`] / [`write_frame`] for blocking code (threads, tests, the host CLI).
//!
//! An oversize length desynchronizes the stream for good, so the decoder stays failed and the
//! caller must close the connection. A body that is not the expected JSON is consumed whole, so
//! the stream stays in step: the caller may answer with an error and go on.

use std::io::{self, Read, Write};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The largest frame body accepted or sent, in bytes. A large OCI `config.json` is tens of KiB.
pub const MAX_FRAME_SIZE: u32 = 4 << 20;
/// Size of the length prefix.
pub const HEADER_LEN: usize = 4;

/// How much [`FrameDecoder::read_from`] reads at a time.
const READ_CHUNK: usize = 16 << 10;
/// Consumed bytes at the front of the decoder's buffer are dropped once there are this many.
const COMPACT_AT: usize = 64 << 10;

/// Errors framing, reading or writing messages.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The length prefix is over the maximum; nothing of the body was buffered.
    #[error("frame body of {len} bytes exceeds the maximum of {max} bytes")]
    TooLarge { len: u64, max: u32 },
    /// The connection ended inside a frame (in its header or its body).
    #[error("connection closed inside a frame: {have} of {need} bytes received")]
    Truncated { have: usize, need: usize },
    #[error("cannot read a frame")]
    Read(#[source] io::Error),
    #[error("cannot write a frame")]
    Write(#[source] io::Error),
    #[error("cannot encode a message as JSON")]
    Encode(#[source] serde_json::Error),
    /// The frame was well delimited but its body is not the expected message.
    #[error("malformed message in a frame body of {len} bytes")]
    Decode {
        len: usize,
        #[source]
        source: serde_json::Error,
    },
}

/// Serializes `msg` into one frame (header and body).
pub fn encode_frame<M: Serialize>(msg: &M) -> Result<Vec<u8>, FrameError> {
    let mut frame = vec![0; HEADER_LEN];
    serde_json::to_writer(&mut frame, msg).map_err(FrameError::Encode)?;
    let len = frame.len() - HEADER_LEN;
    let len = u32::try_from(len)
        .ok()
        .filter(|len| *len <= MAX_FRAME_SIZE)
        .ok_or(FrameError::TooLarge {
            len: len as u64,
            max: MAX_FRAME_SIZE,
        })?;
    frame[..HEADER_LEN].copy_from_slice(&len.to_le_bytes());
    Ok(frame)
}

/// Parses a frame body as a message.
pub fn decode_body<M: DeserializeOwned>(body: &[u8]) -> Result<M, FrameError> {
    serde_json::from_slice(body).map_err(|source| FrameError::Decode {
        len: body.len(),
        source,
    })
}

/// Writes `msg` as one frame and flushes `w`. The frame is built first, so an oversize message
/// fails before anything is written.
pub fn write_frame<W: Write + ?Sized, M: Serialize>(w: &mut W, msg: &M) -> Result<(), FrameError> {
    let frame = encode_frame(msg)?;
    w.write_all(&frame).map_err(FrameError::Write)?;
    w.flush().map_err(FrameError::Write)
}

/// Reads one frame and parses its body. `Ok(None)`: the peer closed the connection cleanly
/// between frames.
pub fn read_frame<R: Read + ?Sized, M: DeserializeOwned>(
    r: &mut R,
) -> Result<Option<M>, FrameError> {
    match read_frame_body(r, MAX_FRAME_SIZE)? {
        Some(body) => decode_body(&body).map(Some),
        None => Ok(None),
    }
}

/// Reads one frame body of at most `max` bytes without parsing it (the agent uses this to
/// answer an unparsable request with its id, see [`crate::request_id_of`]). `Ok(None)`: clean
/// end of the connection between frames.
pub fn read_frame_body<R: Read + ?Sized>(
    r: &mut R,
    max: u32,
) -> Result<Option<Vec<u8>>, FrameError> {
    let mut header = [0; HEADER_LEN];
    let have = read_full(r, &mut header)?;
    if have == 0 {
        return Ok(None);
    }
    if have < HEADER_LEN {
        return Err(FrameError::Truncated {
            have,
            need: HEADER_LEN,
        });
    }
    let len = u32::from_le_bytes(header);
    if len > max {
        return Err(FrameError::TooLarge {
            len: len.into(),
            max,
        });
    }
    let len = len as usize;
    // The body grows as bytes arrive rather than being allocated up front from the header.
    let mut body = Vec::with_capacity(len.min(READ_CHUNK));
    r.take(len as u64)
        .read_to_end(&mut body)
        .map_err(FrameError::Read)?;
    if body.len() < len {
        return Err(FrameError::Truncated {
            have: HEADER_LEN + body.len(),
            need: HEADER_LEN + len,
        });
    }
    Ok(Some(body))
}

/// Reads until `buf` is full or the stream ends; returns how many bytes were read.
fn read_full<R: Read + ?Sized>(r: &mut R, buf: &mut [u8]) -> Result<usize, FrameError> {
    let mut have = 0;
    while have < buf.len() {
        match r.read(&mut buf[have..]) {
            Ok(0) => break,
            Ok(n) => have += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FrameError::Read(e)),
        }
    }
    Ok(have)
}

/// What one [`FrameDecoder::read_from`] call found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadOutcome {
    /// This many bytes were read and pushed.
    Data(usize),
    /// A non-blocking source has nothing now.
    WouldBlock,
    /// The source reached its end; see [`FrameDecoder::finish`].
    Eof,
}

/// Resumable frame reader: takes bytes in any splits and yields complete frame bodies.
///
/// Every header is checked as soon as it is complete, before the body after it is copied in.
/// The buffer holds only validated frames not yet taken plus one partial frame, so memory stays
/// bounded by the maximum frame size as long as the caller drains frames after each push.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Start of the first frame not yet taken.
    start: usize,
    /// Start of the first frame not yet complete; frames in `start..scan` are complete.
    scan: usize,
    max: u32,
    /// The oversize length that failed the stream, if one did.
    failed: Option<u64>,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameDecoder {
    /// A decoder with the protocol's [`MAX_FRAME_SIZE`].
    pub fn new() -> Self {
        Self::with_max_frame_size(MAX_FRAME_SIZE)
    }

    /// A decoder that rejects frame bodies over `max` bytes.
    pub fn with_max_frame_size(max: u32) -> Self {
        Self {
            buf: Vec::new(),
            start: 0,
            scan: 0,
            max,
            failed: None,
        }
    }

    /// Adds bytes from the connection. Fails (for good) when a frame header is over the
    /// maximum; frames completed before that one can still be taken.
    pub fn push(&mut self, mut bytes: &[u8]) -> Result<(), FrameError> {
        self.check_failed()?;
        while !bytes.is_empty() {
            let have = self.buf.len() - self.scan;
            let take = if have < HEADER_LEN {
                HEADER_LEN - have
            } else {
                self.pending_len() + HEADER_LEN - have
            };
            let take = take.min(bytes.len());
            self.buf.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];

            let have = self.buf.len() - self.scan;
            if have < HEADER_LEN {
                continue;
            }
            let len = self.pending_len();
            if len > self.max as usize {
                // Drop the bad header; nothing after it is meaningful.
                self.buf.truncate(self.scan);
                self.failed = Some(len as u64);
                return self.check_failed();
            }
            if have == HEADER_LEN + len {
                self.scan = self.buf.len();
            }
        }
        Ok(())
    }

    /// Reads once from `r` (retrying on `EINTR`) and pushes what came.
    pub fn read_from<R: Read + ?Sized>(&mut self, r: &mut R) -> Result<ReadOutcome, FrameError> {
        self.check_failed()?;
        let mut chunk = [0; READ_CHUNK];
        loop {
            match r.read(&mut chunk) {
                Ok(0) => return Ok(ReadOutcome::Eof),
                Ok(n) => {
                    self.push(&chunk[..n])?;
                    return Ok(ReadOutcome::Data(n));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Ok(ReadOutcome::WouldBlock)
                }
                Err(e) => return Err(FrameError::Read(e)),
            }
        }
    }

    /// The next complete frame body, if one is in. After a failure, frames completed before
    /// the bad header come first, then the error.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        if self.start == self.scan {
            self.check_failed()?;
            return Ok(None);
        }
        let len = frame_len(&self.buf[self.start..]);
        let body_start = self.start + HEADER_LEN;
        let body = self.buf[body_start..body_start + len].to_vec();
        self.start = body_start + len;
        self.compact();
        Ok(Some(body))
    }

    /// The next complete frame, parsed. A [`FrameError::Decode`] consumes the frame; the
    /// stream stays in step.
    pub fn next_message<M: DeserializeOwned>(&mut self) -> Result<Option<M>, FrameError> {
        match self.next_frame()? {
            Some(body) => decode_body(&body).map(Some),
            None => Ok(None),
        }
    }

    /// Call at the end of the stream: fails if it ended inside a frame.
    pub fn finish(&self) -> Result<(), FrameError> {
        self.check_failed()?;
        let have = self.buf.len() - self.scan;
        if have == 0 {
            return Ok(());
        }
        let need = if have < HEADER_LEN {
            HEADER_LEN
        } else {
            HEADER_LEN + self.pending_len()
        };
        Err(FrameError::Truncated { have, need })
    }

    /// Bytes held: frames not yet taken and the partial one.
    pub fn buffered_len(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Body length of the frame at `scan`, whose header is complete.
    fn pending_len(&self) -> usize {
        frame_len(&self.buf[self.scan..])
    }

    fn check_failed(&self) -> Result<(), FrameError> {
        match self.failed {
            Some(len) => Err(FrameError::TooLarge { len, max: self.max }),
            None => Ok(()),
        }
    }

    fn compact(&mut self) {
        if self.start == self.buf.len() {
            self.buf.clear();
        } else if self.start >= COMPACT_AT {
            self.buf.drain(..self.start);
        } else {
            return;
        }
        self.scan -= self.start;
        self.start = 0;
    }
}

/// The body length in the header at the front of `bytes`.
fn frame_len(bytes: &[u8]) -> usize {
    let mut header = [0; HEADER_LEN];
    header.copy_from_slice(&bytes[..HEADER_LEN]);
    u32::from_le_bytes(header) as usize
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Msg {
        n: u32,
        text: String,
    }

    fn msg(n: u32) -> Msg {
        Msg {
            n,
            text: "x".repeat(n as usize % 50),
        }
    }

    /// xorshift64*: deterministic randomness without a dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    fn stream_of(msgs: &[Msg]) -> Vec<u8> {
        msgs.iter().flat_map(|m| encode_frame(m).unwrap()).collect()
    }

    fn drain(decoder: &mut FrameDecoder, out: &mut Vec<Msg>) {
        while let Some(m) = decoder.next_message::<Msg>().unwrap() {
            out.push(m);
        }
    }

    /// A reader that fails the test if asked for more than it was given.
    struct Exact<'a>(&'a [u8]);

    impl Read for Exact<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            assert!(!self.0.is_empty(), "read past the end of the frame");
            let n = buf.len().min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn header_is_little_endian_body_length() {
        let frame = encode_frame(&msg(3)).unwrap();
        let body = br#"{"n":3,"text":"xxx"}"#;
        assert_eq!(frame[..4], (body.len() as u32).to_le_bytes());
        assert_eq!(&frame[4..], body);
    }

    #[test]
    fn blocking_round_trip() {
        let mut wire = Vec::new();
        for n in 0..5 {
            write_frame(&mut wire, &msg(n)).unwrap();
        }
        let mut r = Cursor::new(wire);
        for n in 0..5 {
            assert_eq!(read_frame::<_, Msg>(&mut r).unwrap(), Some(msg(n)));
        }
        assert_eq!(read_frame::<_, Msg>(&mut r).unwrap(), None);
    }

    #[test]
    fn read_frame_reads_exactly_one_frame() {
        let frame = encode_frame(&msg(7)).unwrap();
        let mut r = Exact(&frame);
        assert_eq!(read_frame::<_, Msg>(&mut r).unwrap(), Some(msg(7)));
        assert!(r.0.is_empty());
    }

    #[test]
    fn read_frame_truncated_header_and_body() {
        let frame = encode_frame(&msg(9)).unwrap();
        let err = read_frame::<_, Msg>(&mut Cursor::new(&frame[..3])).unwrap_err();
        assert!(
            matches!(err, FrameError::Truncated { have: 3, need: 4 }),
            "{err:?}"
        );
        let cut = frame.len() - 1;
        let err = read_frame::<_, Msg>(&mut Cursor::new(&frame[..cut])).unwrap_err();
        match err {
            FrameError::Truncated { have, need } => assert_eq!((have, need), (cut, frame.len())),
            other => panic!("{other:?}"),
        }
        let err = read_frame::<_, Msg>(&mut Cursor::new(&frame[..cut])).unwrap_err();
        assert!(err
            .to_string()
            .contains(&format!("{cut} of {} bytes", frame.len())));
    }

    #[test]
    fn read_frame_rejects_oversize_before_reading_the_body() {
        let header = u32::MAX.to_le_bytes();
        // Exact panics if the body were read.
        let err = read_frame::<_, Msg>(&mut Exact(&header)).unwrap_err();
        assert!(
            matches!(err, FrameError::TooLarge { len, max } if len == u32::MAX as u64 && max == MAX_FRAME_SIZE),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "frame body of 4294967295 bytes exceeds the maximum of 4194304 bytes"
        );
        let just_over = (MAX_FRAME_SIZE + 1).to_le_bytes();
        assert!(matches!(
            read_frame::<_, Msg>(&mut Exact(&just_over)),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn read_frame_malformed_body_is_a_decode_error() {
        let mut wire = 5u32.to_le_bytes().to_vec();
        wire.extend_from_slice(b"{nope");
        let err = read_frame::<_, Msg>(&mut Cursor::new(wire)).unwrap_err();
        assert!(matches!(err, FrameError::Decode { len: 5, .. }), "{err:?}");
        // The cause names what is wrong.
        let source = std::error::Error::source(&err).unwrap().to_string();
        assert!(source.contains("line 1"), "{source}");
    }

    #[test]
    fn oversize_message_is_not_written() {
        let big = Msg {
            n: 0,
            text: "y".repeat(MAX_FRAME_SIZE as usize),
        };
        let mut wire = Vec::new();
        let err = write_frame(&mut wire, &big).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { .. }), "{err:?}");
        assert!(wire.is_empty());
    }

    #[test]
    fn write_errors_are_write_errors() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::from(io::ErrorKind::BrokenPipe))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let err = write_frame(&mut Broken, &msg(1)).unwrap_err();
        assert!(matches!(err, FrameError::Write(_)), "{err:?}");
    }

    #[test]
    fn decoder_byte_by_byte() {
        let msgs: Vec<Msg> = (0..20).map(msg).collect();
        let wire = stream_of(&msgs);
        let mut decoder = FrameDecoder::new();
        let mut out = Vec::new();
        for byte in &wire {
            decoder.push(std::slice::from_ref(byte)).unwrap();
            drain(&mut decoder, &mut out);
        }
        assert_eq!(out, msgs);
        decoder.finish().unwrap();
        assert_eq!(decoder.buffered_len(), 0);
    }

    #[test]
    fn decoder_all_at_once() {
        let msgs: Vec<Msg> = (0..20).map(msg).collect();
        let mut decoder = FrameDecoder::new();
        decoder.push(&stream_of(&msgs)).unwrap();
        let mut out = Vec::new();
        drain(&mut decoder, &mut out);
        assert_eq!(out, msgs);
        decoder.finish().unwrap();
    }

    #[test]
    fn decoder_random_splits() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..200 {
            let msgs: Vec<Msg> = (0..rng.below(12)).map(|_| msg(rng.next() as u32)).collect();
            let wire = stream_of(&msgs);
            let mut decoder = FrameDecoder::new();
            let mut out = Vec::new();
            let mut rest = &wire[..];
            while !rest.is_empty() {
                let n = 1 + rng.below(rest.len().min(40));
                decoder.push(&rest[..n]).unwrap();
                rest = &rest[n..];
                if rng.below(2) == 0 {
                    drain(&mut decoder, &mut out);
                }
            }
            drain(&mut decoder, &mut out);
            assert_eq!(out, msgs);
            decoder.finish().unwrap();
        }
    }

    #[test]
    fn decoder_empty_frame_is_a_frame() {
        let mut decoder = FrameDecoder::new();
        decoder.push(&0u32.to_le_bytes()).unwrap();
        assert_eq!(decoder.next_frame().unwrap(), Some(Vec::new()));
        assert_eq!(decoder.next_frame().unwrap(), None);
        // ...whose body is no message.
        decoder.push(&0u32.to_le_bytes()).unwrap();
        assert!(matches!(
            decoder.next_message::<Msg>(),
            Err(FrameError::Decode { len: 0, .. })
        ));
    }

    #[test]
    fn decoder_oversize_rejected_without_buffering() {
        let mut decoder = FrameDecoder::with_max_frame_size(1024);
        let mut wire = encode_frame(&msg(1)).unwrap();
        wire.extend_from_slice(&1025u32.to_le_bytes());
        wire.extend(std::iter::repeat_n(b'a', 1 << 20));
        let err = decoder.push(&wire).unwrap_err();
        assert!(
            matches!(
                err,
                FrameError::TooLarge {
                    len: 1025,
                    max: 1024
                }
            ),
            "{err:?}"
        );
        // Nothing of the oversize frame was copied in.
        assert!(decoder.buf.capacity() < 1024, "{}", decoder.buf.capacity());
        // The frame before it still comes out, then the error, for good.
        assert_eq!(decoder.next_message::<Msg>().unwrap(), Some(msg(1)));
        assert!(matches!(
            decoder.next_frame(),
            Err(FrameError::TooLarge { .. })
        ));
        assert!(matches!(
            decoder.push(b"more"),
            Err(FrameError::TooLarge { .. })
        ));
        assert!(matches!(decoder.finish(), Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn decoder_oversize_header_split_across_pushes() {
        let mut decoder = FrameDecoder::new();
        let header = u32::MAX.to_le_bytes();
        decoder.push(&header[..2]).unwrap();
        decoder.push(&header[2..3]).unwrap();
        assert!(matches!(
            decoder.push(&header[3..]),
            Err(FrameError::TooLarge { .. })
        ));
        assert!(decoder.buf.capacity() < 64);
    }

    #[test]
    fn decoder_decode_error_keeps_the_stream_in_step() {
        let mut wire = 3u32.to_le_bytes().to_vec();
        wire.extend_from_slice(b"{x}");
        wire.extend(encode_frame(&msg(4)).unwrap());
        let mut decoder = FrameDecoder::new();
        decoder.push(&wire).unwrap();
        assert!(matches!(
            decoder.next_message::<Msg>(),
            Err(FrameError::Decode { len: 3, .. })
        ));
        assert_eq!(decoder.next_message::<Msg>().unwrap(), Some(msg(4)));
    }

    #[test]
    fn decoder_finish_reports_a_truncated_frame() {
        let frame = encode_frame(&msg(10)).unwrap();
        let mut decoder = FrameDecoder::new();
        decoder.push(&frame[..2]).unwrap();
        assert!(matches!(
            decoder.finish(),
            Err(FrameError::Truncated { have: 2, need: 4 })
        ));
        decoder.push(&frame[2..frame.len() - 1]).unwrap();
        let err = decoder.finish().unwrap_err();
        match err {
            FrameError::Truncated { have, need } => {
                assert_eq!((have, need), (frame.len() - 1, frame.len()))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(decoder.next_frame().unwrap(), None);
    }

    #[test]
    fn decoder_reads_from_a_nonblocking_source() {
        /// Hands out its chunks one per read, `WouldBlock` between them, then end of file.
        struct Trickle {
            chunks: Vec<Vec<u8>>,
            blocked: bool,
        }
        impl Read for Trickle {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                self.blocked = !self.blocked;
                if self.blocked {
                    return Err(io::Error::from(io::ErrorKind::WouldBlock));
                }
                if self.chunks.is_empty() {
                    return Ok(0);
                }
                let chunk = self.chunks.remove(0);
                buf[..chunk.len()].copy_from_slice(&chunk);
                Ok(chunk.len())
            }
        }
        let msgs: Vec<Msg> = (0..6).map(msg).collect();
        let wire = stream_of(&msgs);
        let mut source = Trickle {
            chunks: wire.chunks(7).map(<[u8]>::to_vec).collect(),
            blocked: false,
        };
        let mut decoder = FrameDecoder::new();
        let mut out = Vec::new();
        let mut would_block = 0;
        loop {
            match decoder.read_from(&mut source).unwrap() {
                ReadOutcome::Data(n) => assert!(n <= 7),
                ReadOutcome::WouldBlock => would_block += 1,
                ReadOutcome::Eof => break,
            }
            drain(&mut decoder, &mut out);
        }
        decoder.finish().unwrap();
        assert_eq!(out, msgs);
        assert!(would_block > 0);
    }

    #[test]
    fn decoder_memory_stays_bounded_when_drained() {
        let mut decoder = FrameDecoder::new();
        let frame = encode_frame(&msg(49)).unwrap();
        let mut out = Vec::new();
        for _ in 0..10_000 {
            decoder.push(&frame).unwrap();
            drain(&mut decoder, &mut out);
        }
        assert_eq!(out.len(), 10_000);
        assert!(decoder.buf.capacity() < 4 * frame.len());
    }

    #[test]
    fn decoder_random_garbage_never_panics() {
        let mut rng = Rng(42);
        for _ in 0..2_000 {
            let mut decoder = FrameDecoder::with_max_frame_size(64);
            let len = rng.below(300);
            let garbage: Vec<u8> = (0..len)
                .map(|_| {
                    // Small lengths are likely, so frames complete and bodies get parsed.
                    if rng.below(4) == 0 {
                        rng.below(70) as u8
                    } else {
                        rng.next() as u8
                    }
                })
                .collect();
            let mut rest = &garbage[..];
            while !rest.is_empty() {
                let n = 1 + rng.below(rest.len());
                let pushed = decoder.push(&rest[..n]);
                rest = &rest[n..];
                loop {
                    match decoder.next_message::<Msg>() {
                        Ok(Some(_)) | Err(FrameError::Decode { .. }) => {}
                        Ok(None) => break,
                        Err(FrameError::TooLarge { .. }) => break,
                        Err(other) => panic!("unexpected {other:?}"),
                    }
                }
                if pushed.is_err() {
                    break;
                }
            }
            let _ = decoder.finish();
            assert!(decoder.buffered_len() <= 64 + HEADER_LEN);
        }
    }
}
