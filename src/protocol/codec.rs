//! The wire format: one message per datagram.
//!
//! ```text
//! offset  size  field
//!      0     3  magic, b"VMD"
//!      3     1  protocol version, PROTOCOL_VERSION
//!      4     4  payload length in bytes, u32 little-endian, at most MAX_PAYLOAD
//!      8     n  payload: the message as UTF-8 JSON (see the messages module for its shape)
//! ```
//!
//! Decoding checks, in this order: the datagram holds a whole header, the magic, the version, the
//! declared length is at most [`MAX_PAYLOAD`], the declared length equals the actual payload
//! length, the payload is UTF-8, the payload is JSON of the expected message type. Decoding does
//! not validate a [`VmConfig`](super::VmConfig): call [`VmConfig::validate`](super::VmConfig::validate).

use serde::Serialize;
use serde::de::DeserializeOwned;
use thiserror::Error;

use super::messages::{Event, Request};

/// The first three bytes of every datagram.
pub const MAGIC: [u8; 3] = *b"VMD";
/// The protocol version this build speaks, the fourth byte of every datagram.
pub const PROTOCOL_VERSION: u8 = 1;
/// The size of the header that precedes the payload.
pub const HEADER_LEN: usize = 8;
/// The largest payload allowed, in bytes (64 KiB).
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// The largest datagram allowed: a header and a payload of [`MAX_PAYLOAD`] bytes.
pub const MAX_DATAGRAM: usize = HEADER_LEN + MAX_PAYLOAD;

/// A message type of the control protocol: [`Request`] or [`Event`].
pub(crate) trait Message: Serialize + DeserializeOwned {
    /// What the message is called in errors.
    const KIND: &'static str;
}

impl Message for Request {
    const KIND: &'static str = "request";
}

impl Message for Event {
    const KIND: &'static str = "event";
}

/// Why a message could not be encoded.
#[derive(Debug, Error)]
pub enum EncodeError {
    /// serde_json failed to serialize the message.
    #[error("cannot serialize {kind} as JSON")]
    Json {
        /// `"request"` or `"event"`.
        kind: &'static str,
        /// What serde_json said.
        #[source]
        source: serde_json::Error,
    },
    /// The JSON payload is larger than [`MAX_PAYLOAD`] (a very long string, such as an event's
    /// reason or a command line that was not validated).
    #[error("{kind} payload is {len} bytes; at most {MAX_PAYLOAD} are allowed")]
    TooLarge {
        /// `"request"` or `"event"`.
        kind: &'static str,
        /// The payload's length in bytes.
        len: usize,
    },
}

/// Why a datagram is not a valid message.
#[derive(Debug, Error)]
pub enum DecodeError {
    /// The datagram is shorter than the header.
    #[error("datagram is {len} bytes, shorter than the {HEADER_LEN}-byte header")]
    TooShort {
        /// The datagram's length in bytes.
        len: usize,
    },
    /// The datagram does not start with [`MAGIC`].
    #[error("datagram starts with {found:02x?}, not the magic \"VMD\"")]
    BadMagic {
        /// The first three bytes of the datagram.
        found: [u8; 3],
    },
    /// The peer speaks another protocol version.
    #[error("unsupported protocol version {found}; this build speaks version {supported}")]
    UnsupportedVersion {
        /// The version in the datagram.
        found: u8,
        /// [`PROTOCOL_VERSION`].
        supported: u8,
    },
    /// The header declares a payload larger than [`MAX_PAYLOAD`].
    #[error("header declares a {len}-byte payload; at most {MAX_PAYLOAD} bytes are allowed")]
    TooLarge {
        /// The declared payload length.
        len: u32,
    },
    /// The header's payload length differs from the datagram's.
    #[error("header declares a {declared}-byte payload but the datagram carries {actual} bytes")]
    LengthMismatch {
        /// The payload length in the header.
        declared: u32,
        /// The payload bytes actually present.
        actual: usize,
    },
    /// The payload is not UTF-8.
    #[error("{kind} payload is not UTF-8")]
    NotUtf8 {
        /// `"request"` or `"event"`.
        kind: &'static str,
        /// Where the first invalid byte is.
        #[source]
        source: std::str::Utf8Error,
    },
    /// The payload is not JSON of the expected message type (syntax error, unknown variant or
    /// field, missing field, wrong type, trailing data).
    #[error("invalid {kind} JSON")]
    Json {
        /// `"request"` or `"event"`.
        kind: &'static str,
        /// What serde_json said.
        #[source]
        source: serde_json::Error,
    },
}

/// Encodes `message` as one datagram.
pub(crate) fn encode<M: Message>(message: &M) -> Result<Vec<u8>, EncodeError> {
    let mut datagram = Vec::with_capacity(256);
    datagram.extend_from_slice(&MAGIC);
    datagram.push(PROTOCOL_VERSION);
    datagram.extend_from_slice(&[0; 4]);
    serde_json::to_writer(&mut datagram, message).map_err(|source| EncodeError::Json {
        kind: M::KIND,
        source,
    })?;
    let len = datagram.len() - HEADER_LEN;
    let too_large = EncodeError::TooLarge { kind: M::KIND, len };
    if len > MAX_PAYLOAD {
        return Err(too_large);
    }
    let declared = u32::try_from(len).map_err(|_| too_large)?;
    datagram[4..HEADER_LEN].copy_from_slice(&declared.to_le_bytes());
    Ok(datagram)
}

/// Decodes one datagram as a message of type `M`.
pub(crate) fn decode<M: Message>(datagram: &[u8]) -> Result<M, DecodeError> {
    let Some((header, payload)) = datagram.split_first_chunk::<HEADER_LEN>() else {
        return Err(DecodeError::TooShort {
            len: datagram.len(),
        });
    };
    let [m0, m1, m2, version, l0, l1, l2, l3] = *header;
    if [m0, m1, m2] != MAGIC {
        return Err(DecodeError::BadMagic {
            found: [m0, m1, m2],
        });
    }
    if version != PROTOCOL_VERSION {
        return Err(DecodeError::UnsupportedVersion {
            found: version,
            supported: PROTOCOL_VERSION,
        });
    }
    let declared = u32::from_le_bytes([l0, l1, l2, l3]);
    let declared_len = usize::try_from(declared)
        .ok()
        .filter(|&len| len <= MAX_PAYLOAD)
        .ok_or(DecodeError::TooLarge { len: declared })?;
    if declared_len != payload.len() {
        return Err(DecodeError::LengthMismatch {
            declared,
            actual: payload.len(),
        });
    }
    let text = std::str::from_utf8(payload).map_err(|source| DecodeError::NotUtf8 {
        kind: M::KIND,
        source,
    })?;
    serde_json::from_str(text).map_err(|source| DecodeError::Json {
        kind: M::KIND,
        source,
    })
}

/// Encodes a request as one datagram.
pub fn encode_request(request: &Request) -> Result<Vec<u8>, EncodeError> {
    encode(request)
}

/// Encodes an event as one datagram.
pub fn encode_event(event: &Event) -> Result<Vec<u8>, EncodeError> {
    encode(event)
}

/// Decodes one datagram as a request.
pub fn decode_request(datagram: &[u8]) -> Result<Request, DecodeError> {
    decode(datagram)
}

/// Decodes one datagram as an event.
pub fn decode_event(datagram: &[u8]) -> Result<Event, DecodeError> {
    decode(datagram)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::messages::{RunState, VmConfig};
    use proptest::prelude::*;

    /// A datagram with a valid header around `payload`.
    fn framed(payload: &[u8]) -> Vec<u8> {
        let mut datagram = MAGIC.to_vec();
        datagram.push(PROTOCOL_VERSION);
        datagram.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_le_bytes());
        datagram.extend_from_slice(payload);
        datagram
    }

    #[test]
    fn header_layout() {
        let datagram = encode_request(&Request::Pause).unwrap();
        assert_eq!(datagram, b"VMD\x01\x07\0\0\0\"pause\"");
    }

    #[test]
    fn round_trip() {
        let request = Request::Start {
            config: VmConfig {
                name: "a".into(),
                vcpus: 1,
                memory_bytes: 16 << 20,
                cmdline: "quiet \"x\" \u{e9}".into(),
                disks: Vec::new(),
                entropy: false,
                interfaces: Vec::new(),
            },
        };
        assert_eq!(
            decode_request(&encode_request(&request).unwrap()).unwrap(),
            request
        );
        let event = Event::State {
            state: RunState::Running,
        };
        assert_eq!(decode_event(&encode_event(&event).unwrap()).unwrap(), event);
    }

    #[test]
    fn short() {
        for len in 0..HEADER_LEN {
            let datagram = &framed(b"")[..len];
            assert!(
                matches!(decode_request(datagram), Err(DecodeError::TooShort { len: l }) if l == len)
            );
        }
    }

    #[test]
    fn bad_magic() {
        let mut datagram = framed(b"\"pause\"");
        datagram[0] = b'X';
        let err = decode_request(&datagram).unwrap_err();
        assert!(matches!(err, DecodeError::BadMagic { found } if found == *b"XMD"));
        assert_eq!(
            err.to_string(),
            "datagram starts with [58, 4d, 44], not the magic \"VMD\""
        );
    }

    #[test]
    fn wrong_version() {
        let mut datagram = framed(b"\"pause\"");
        datagram[3] = 2;
        let err = decode_request(&datagram).unwrap_err();
        assert!(matches!(
            err,
            DecodeError::UnsupportedVersion {
                found: 2,
                supported: 1
            }
        ));
        assert_eq!(
            err.to_string(),
            "unsupported protocol version 2; this build speaks version 1"
        );
    }

    #[test]
    fn length_mismatch() {
        let mut datagram = framed(b"\"pause\"");
        datagram.push(b' ');
        assert!(matches!(
            decode_request(&datagram),
            Err(DecodeError::LengthMismatch {
                declared: 7,
                actual: 8
            })
        ));
        datagram.truncate(HEADER_LEN + 3);
        assert!(matches!(
            decode_request(&datagram),
            Err(DecodeError::LengthMismatch {
                declared: 7,
                actual: 3
            })
        ));
    }

    #[test]
    fn too_large() {
        // Declared too large, whatever follows.
        let mut datagram = framed(b"\"pause\"");
        datagram[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode_request(&datagram),
            Err(DecodeError::TooLarge { len: u32::MAX })
        ));
        // Declared and present, one byte over the limit.
        let payload = vec![b' '; MAX_PAYLOAD + 1];
        assert!(matches!(
            decode_event(&framed(&payload)),
            Err(DecodeError::TooLarge { len }) if len as usize == MAX_PAYLOAD + 1
        ));
        // Exactly at the limit is fine: JSON allows trailing whitespace.
        let mut payload = b"\"created\"".to_vec();
        payload.resize(MAX_PAYLOAD, b' ');
        assert_eq!(decode_event(&framed(&payload)).unwrap(), Event::Created);
    }

    #[test]
    fn encode_too_large() {
        let event = Event::Error {
            reason: "x".repeat(MAX_PAYLOAD),
        };
        assert!(matches!(
            encode_event(&event),
            Err(EncodeError::TooLarge { kind: "event", len }) if len > MAX_PAYLOAD
        ));
    }

    #[test]
    fn not_utf8() {
        assert!(matches!(
            decode_event(&framed(b"\"cr\xffeated\"")),
            Err(DecodeError::NotUtf8 { kind: "event", .. })
        ));
    }

    fn json_error(result: Result<impl std::fmt::Debug, DecodeError>) -> String {
        match result {
            Err(DecodeError::Json { source, .. }) => source.to_string(),
            other => panic!("expected a JSON error, got {other:?}"),
        }
    }

    #[test]
    fn bad_json() {
        for payload in [
            &b""[..],
            b"{",
            b"\"pause",
            b"pause",
            b"\"pause\" x",
            b"null",
            b"[]",
        ] {
            json_error(decode_request(&framed(payload)));
        }
    }

    #[test]
    fn unknown_field() {
        let err = json_error(decode_request(&framed(
            br#"{"shutdown":{"deadline_ms":1,"force":true}}"#,
        )));
        assert!(err.contains("unknown field `force`"), "{err}");
        let err = json_error(decode_request(&framed(
            br#"{"start":{"config":{"name":"a","vcpus":1,"memory_bytes":16777216,"cmdline":"","extra":0}}}"#,
        )));
        assert!(err.contains("unknown field `extra`"), "{err}");
        // An object with two variants is not a request either.
        json_error(decode_request(&framed(br#"{"pause":null,"resume":null}"#)));
    }

    #[test]
    fn unknown_variant() {
        let err = json_error(decode_request(&framed(br#""reboot""#)));
        assert!(err.contains("unknown variant `reboot`"), "{err}");
    }

    #[test]
    fn wrong_type() {
        // A valid event is not a request, and the other way round.
        let err = json_error(decode_request(&encode_event(&Event::Created).unwrap()));
        assert!(err.contains("unknown variant `created`"), "{err}");
        json_error(decode_event(&encode_request(&Request::Pause).unwrap()));
        // Fields of the wrong JSON type or out of range.
        for payload in [
            &br#"{"shutdown":{"deadline_ms":"5s"}}"#[..],
            br#"{"shutdown":{"deadline_ms":-1}}"#,
            br#"{"shutdown":{"deadline_ms":1.5}}"#,
            br#"{"shutdown":{}}"#,
            br#"{"start":{"config":{"name":"a","vcpus":4294967296,"memory_bytes":16777216,"cmdline":""}}}"#,
        ] {
            json_error(decode_request(&framed(payload)));
        }
        let err = json_error(decode_event(&framed(br#"{"state":{"state":"stopped"}}"#)));
        assert!(err.contains("unknown variant `stopped`"), "{err}");
    }

    #[test]
    fn error_display_adds_context_once() {
        let err = decode_event(&framed(b"{")).unwrap_err();
        assert_eq!(err.to_string(), "invalid event JSON");
        let source = std::error::Error::source(&err).unwrap().to_string();
        assert!(source.contains("EOF"), "{source}");
    }

    fn check_never_panics(bytes: &[u8]) {
        let _ = decode_request(bytes);
        let _ = decode_event(bytes);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            check_never_panics(&bytes);
        }

        #[test]
        fn arbitrary_payload_never_panics(payload in proptest::collection::vec(any::<u8>(), 0..512)) {
            check_never_panics(&framed(&payload));
        }

        #[test]
        fn arbitrary_json_ish_payload_never_panics(
            payload in r#"[{}\[\]":,0-9a-z_ .\-\\\u{e9}]{0,200}"#,
        ) {
            check_never_panics(&framed(payload.as_bytes()));
        }
    }
}
