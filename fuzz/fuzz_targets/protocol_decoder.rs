//! Fuzzes everything the agent (and the host) parse from the other side of the control and
//! stream connections: the frame decoder fed in splits chosen by the input, every message type,
//! and the blocking reader. Nothing may panic, and the decoder must never hold more than one
//! maximum frame plus the frames not yet taken.

#![no_main]

use hull_protocol::{
    decode_body, read_frame, request_id_of, AgentMessage, FrameDecoder, FrameError, HostMessage,
    StreamHello, StreamReply, HEADER_LEN,
};
use libfuzzer_sys::fuzz_target;

/// Small, so that the fuzzer reaches both complete frames and the oversize path.
const MAX: u32 = 4096;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the split size; the rest is the stream.
    let Some((&split, stream)) = data.split_first() else {
        return;
    };
    let split = usize::from(split).max(1);

    let mut decoder = FrameDecoder::with_max_frame_size(MAX);
    for chunk in stream.chunks(split) {
        let pushed = decoder.push(chunk);
        loop {
            match decoder.next_frame() {
                Ok(Some(body)) => {
                    assert!(body.len() <= MAX as usize);
                    let _ = decode_body::<HostMessage>(&body);
                    let _ = decode_body::<AgentMessage>(&body);
                    let _ = decode_body::<StreamHello>(&body);
                    let _ = decode_body::<StreamReply>(&body);
                    let _ = request_id_of(&body);
                }
                Ok(None) => break,
                Err(FrameError::TooLarge { .. }) => break,
                Err(e) => panic!("next_frame failed with {e}"),
            }
        }
        assert!(decoder.buffered_len() <= MAX as usize + HEADER_LEN);
        if pushed.is_err() {
            break;
        }
    }
    let _ = decoder.finish();

    // The blocking reader over the same bytes.
    let mut reader = stream;
    while let Ok(Some(_)) = read_frame::<_, HostMessage>(&mut reader) {}
});
