//! The console's escape sequences, as in cu(1) and ssh(1): `~.` at the start of a line
//! disconnects, `~?` lists the escapes. The escape character is `~` unless changed (`-e`), or
//! there is none at all.
//!
//! "Start of a line" is the very first byte of the session and any byte that follows `\r` or `\n`
//! (a terminal in raw mode sends `\r` for Enter). There, an escape character is held back until
//! the next byte decides what it was:
//! - `.` disconnects; neither byte reaches the guest;
//! - `?` asks for the list of escapes; neither byte reaches the guest;
//! - the escape character again sends it once (the way to type it at the start of a line);
//! - anything else sends the held escape character followed by that byte.
//!
//! Everywhere else every byte passes through unchanged. The detector keeps its state between
//! calls, so a sequence split across two reads is still recognised.

/// What the guest should receive for one chunk of input, and whether the user asked to leave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filtered {
    /// The bytes to send to the guest, in order.
    pub forward: Vec<u8>,
    /// `~.` was seen: disconnect after sending `forward` (the bytes before the escape).
    pub disconnect: bool,
    /// `~?` was seen (at least once): show the list of escapes.
    pub help: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The next byte starts a line.
    LineStart,
    /// A `~` at the start of a line is held back.
    Tilde,
    /// Inside a line.
    MidLine,
}

/// The `~.` state machine; see the [module documentation](self).
#[derive(Debug, Clone)]
pub struct EscapeDetector {
    state: State,
    /// The escape character; `None`: no escapes.
    escape: Option<u8>,
}

impl Default for EscapeDetector {
    fn default() -> Self {
        Self::new()
    }
}

impl EscapeDetector {
    /// A detector for `~` at the start of a line (the start of the session counts as one).
    pub fn new() -> Self {
        Self::with_escape(Some(b'~'))
    }

    /// A detector for `escape` (`None`: every byte passes).
    pub fn with_escape(escape: Option<u8>) -> Self {
        Self {
            state: State::LineStart,
            escape,
        }
    }

    /// The list of escapes for `~?`, with `\r\n` line ends (the terminal is raw).
    pub fn help(&self) -> String {
        let Some(escape) = self.escape else {
            return String::new();
        };
        let e = shown(escape);
        format!(
            "\r\nSupported escape sequences (at the start of a line):\r\n \
             {e}.  - disconnect\r\n \
             {e}?  - this message\r\n \
             {e}{e}  - send the escape character {e}\r\n\
             (vmctl console -e CHAR changes the escape character)\r\n"
        )
    }

    /// Runs `input` through the state machine. Once a disconnect is reported, the rest of
    /// `input` is dropped.
    pub fn filter(&mut self, input: &[u8]) -> Filtered {
        let mut forward = Vec::with_capacity(input.len() + 1);
        let mut help = false;
        let Some(escape) = self.escape else {
            return Filtered {
                forward: input.to_vec(),
                disconnect: false,
                help,
            };
        };
        for &byte in input {
            match (self.state, byte) {
                (State::LineStart, byte) if byte == escape => self.state = State::Tilde,
                (State::Tilde, b'.') => {
                    self.state = State::LineStart;
                    return Filtered {
                        forward,
                        disconnect: true,
                        help,
                    };
                }
                (State::Tilde, b'?') => {
                    help = true;
                    self.state = State::LineStart;
                }
                (State::Tilde, byte) if byte == escape => {
                    forward.push(escape);
                    self.state = State::MidLine;
                }
                (State::Tilde, other) => {
                    forward.extend_from_slice(&[escape, other]);
                    self.state = Self::after(other);
                }
                (State::LineStart | State::MidLine, other) => {
                    forward.push(other);
                    self.state = Self::after(other);
                }
            }
        }
        Filtered {
            forward,
            disconnect: false,
            help,
        }
    }

    /// The state after a byte that was sent to the guest.
    fn after(byte: u8) -> State {
        if matches!(byte, b'\r' | b'\n') {
            State::LineStart
        } else {
            State::MidLine
        }
    }
}

/// How an escape character is written: itself, or `^X` for a control character.
pub fn shown(byte: u8) -> String {
    match byte {
        0x7f => "^?".to_owned(),
        byte if byte < 0x20 => format!("^{}", char::from(byte + b'@')),
        byte => char::from(byte).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `chunks` one after the other; returns everything forwarded and whether (and after
    /// which chunk) a disconnect was reported.
    fn run(chunks: &[&[u8]]) -> (Vec<u8>, Option<usize>) {
        let mut detector = EscapeDetector::new();
        let mut sent = Vec::new();
        for (i, chunk) in chunks.iter().enumerate() {
            let out = detector.filter(chunk);
            sent.extend_from_slice(&out.forward);
            if out.disconnect {
                return (sent, Some(i));
            }
        }
        (sent, None)
    }

    #[test]
    fn plain_text_passes_through() {
        let input: &[u8] = b"ls -l ~/x\r\necho a~.b\r";
        assert_eq!(run(&[input]), (input.to_vec(), None));
    }

    #[test]
    fn escape_at_session_start_disconnects() {
        assert_eq!(run(&[b"~."]), (vec![], Some(0)));
    }

    #[test]
    fn escape_after_cr_or_lf_disconnects_and_keeps_what_came_before() {
        assert_eq!(
            run(&[b"uptime\r~.ignored"]),
            (b"uptime\r".to_vec(), Some(0))
        );
        assert_eq!(run(&[b"uptime\n~."]), (b"uptime\n".to_vec(), Some(0)));
    }

    #[test]
    fn escape_inside_a_line_is_data() {
        assert_eq!(run(&[b"a~.\r"]), (b"a~.\r".to_vec(), None));
    }

    #[test]
    fn escape_split_across_reads() {
        assert_eq!(run(&[b"x\r", b"~", b"."]), (b"x\r".to_vec(), Some(2)));
        assert_eq!(run(&[b"\r~", b".rest"]), (b"\r".to_vec(), Some(1)));
    }

    #[test]
    fn double_tilde_sends_one_tilde_and_then_is_mid_line() {
        assert_eq!(run(&[b"~~."]), (b"~.".to_vec(), None));
        assert_eq!(run(&[b"~", b"~", b"."]), (b"~.".to_vec(), None));
    }

    #[test]
    fn tilde_followed_by_other_byte_sends_both() {
        assert_eq!(run(&[b"~a"]), (b"~a".to_vec(), None));
        // A held tilde followed by Enter: both go through, and a new line starts.
        assert_eq!(run(&[b"~\r~."]), (b"~\r".to_vec(), Some(0)));
    }

    #[test]
    fn held_tilde_is_not_sent_until_decided() {
        let mut detector = EscapeDetector::new();
        assert_eq!(
            detector.filter(b"~"),
            Filtered {
                forward: vec![],
                disconnect: false,
                help: false,
            }
        );
        assert_eq!(detector.filter(b"x").forward, b"~x".to_vec());
    }

    #[test]
    fn control_bytes_are_data() {
        // Ctrl-C, Ctrl-D and Ctrl-Z go to the guest: only `~.` leaves.
        assert_eq!(run(&[b"\x03\x04\x1a"]), (b"\x03\x04\x1a".to_vec(), None));
    }

    #[test]
    fn question_mark_asks_for_help_and_sends_nothing() {
        let mut detector = EscapeDetector::new();
        let out = detector.filter(b"~?ls\r");
        assert!(out.help && !out.disconnect);
        assert_eq!(out.forward, b"ls\r".to_vec());
        let help = detector.help();
        assert!(help.contains("~.  - disconnect\r\n"), "{help}");
        assert!(help.contains("~?  - this message"), "{help}");
        assert!(!detector.filter(b"a~?").help);
    }

    #[test]
    fn another_escape_character_replaces_the_tilde() {
        let mut detector = EscapeDetector::with_escape(Some(0x1d));
        assert_eq!(detector.filter(b"~.").forward, b"~.".to_vec());
        let out = detector.filter(b"\r\x1d.");
        assert!(out.disconnect);
        assert_eq!(out.forward, b"\r".to_vec());
        assert!(
            EscapeDetector::with_escape(Some(0x1d))
                .help()
                .contains("^].  - disconnect")
        );
        let mut none = EscapeDetector::with_escape(None);
        let out = none.filter(b"~.~?");
        assert_eq!(
            (out.forward, out.disconnect, out.help),
            (b"~.~?".to_vec(), false, false)
        );
    }
}
