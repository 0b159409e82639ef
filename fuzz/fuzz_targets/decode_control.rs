//! Feeds arbitrary bytes to both control-protocol decoders: they must return a message or an
//! error, never panic, and whatever decodes must re-encode to a datagram that decodes the same.
//!
//! The input is tried twice: as a whole datagram (header checks), and as the payload behind a
//! valid header, so the fuzzer reaches the JSON decoding without having to guess the magic and
//! the length first.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vmd::protocol::{
    MAGIC, PROTOCOL_VERSION, decode_event, decode_request, encode_event, encode_request,
};

fn check(datagram: &[u8]) {
    if let Ok(request) = decode_request(datagram) {
        let encoded = encode_request(&request).expect("a decoded request re-encodes");
        assert_eq!(decode_request(&encoded).ok(), Some(request));
    }
    if let Ok(event) = decode_event(datagram) {
        let encoded = encode_event(&event).expect("a decoded event re-encodes");
        assert_eq!(decode_event(&encoded).ok(), Some(event));
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    if let Ok(len) = u32::try_from(data.len()) {
        let mut datagram = Vec::with_capacity(8 + data.len());
        datagram.extend_from_slice(&MAGIC);
        datagram.push(PROTOCOL_VERSION);
        datagram.extend_from_slice(&len.to_le_bytes());
        datagram.extend_from_slice(data);
        check(&datagram);
    }
});
