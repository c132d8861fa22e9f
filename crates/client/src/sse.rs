//! A parser of Server-Sent Events (the `text/event-stream` format of the WHATWG HTML
//! standard), fed with the body's bytes as they arrive, in chunks cut anywhere.
//!
//! Lines end with `\n`, `\r\n` or `\r`; a line starting with `:` is a comment; `field: value`
//! (one space after the colon dropped) sets `event`, `data` (repeated lines are joined with
//! `\n`) or `id`; other fields (`retry`…) are ignored; a blank line ends the event. An event
//! without data is not dispatched; an unfinished event at the end of the stream is dropped.

use std::collections::VecDeque;

/// The longest line (and the most data of one event) accepted: a stream that goes past it is
/// not a gapguard watch, and buffering it all would only exhaust memory.
pub(crate) const SSE_EVENT_BYTES_MAX: usize = 64 * 1024 * 1024;

/// One dispatched event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SseEvent {
    /// The `event` field, or `message` when the event had none.
    pub event: String,
    /// The `data` lines, joined with `\n`.
    pub data: String,
    /// The last event id set so far on the stream (ids carry over to later events).
    pub id: Option<String>,
}

/// The stream went past [`SSE_EVENT_BYTES_MAX`] in one line or event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TooLong;

/// The parser's state between chunks.
#[derive(Debug, Default)]
pub(crate) struct SseParser {
    /// Bytes of the line being read (no line ending yet).
    line: Vec<u8>,
    /// The last byte seen was a `\r`, so a `\n` right after it ends nothing more.
    after_cr: bool,
    /// The byte-order mark at the very start has been dealt with.
    started: bool,
    /// The `event` field of the event being read.
    event: Option<String>,
    /// The `data` of the event being read, each line followed by `\n`.
    data: String,
    /// Whether a `data` field was seen in the event being read.
    has_data: bool,
    /// The last event id.
    id: Option<String>,
    /// Events parsed and not yet taken.
    ready: VecDeque<SseEvent>,
}

impl SseParser {
    /// A parser at the start of a stream.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Reads a chunk of the stream; the events it completes can then be taken with
    /// [`SseParser::next_event`].
    pub(crate) fn feed(&mut self, mut chunk: &[u8]) -> Result<(), TooLong> {
        if !self.started && !chunk.is_empty() {
            // A UTF-8 byte-order mark may open the stream (and may be cut by a chunk boundary).
            let bom: &[u8] = b"\xEF\xBB\xBF";
            let have = self.line.len();
            let wanted = (bom.len() - have).min(chunk.len());
            if bom[..have] == self.line[..] && bom[have..have + wanted] == chunk[..wanted] {
                if have + wanted < bom.len() {
                    self.line.extend_from_slice(&chunk[..wanted]);
                    return Ok(());
                }
                self.line.clear();
                chunk = &chunk[wanted..];
            }
            self.started = true;
        }
        while !chunk.is_empty() {
            if self.after_cr && chunk[0] == b'\n' {
                chunk = &chunk[1..];
            }
            self.after_cr = false;
            match chunk.iter().position(|&b| b == b'\n' || b == b'\r') {
                Some(end) => {
                    self.push_line_bytes(&chunk[..end])?;
                    self.after_cr = chunk[end] == b'\r';
                    chunk = &chunk[end + 1..];
                    let line = std::mem::take(&mut self.line);
                    self.line(&String::from_utf8_lossy(&line))?;
                }
                None => {
                    self.push_line_bytes(chunk)?;
                    chunk = &[];
                }
            }
        }
        Ok(())
    }

    /// The next complete event, oldest first.
    pub(crate) fn next_event(&mut self) -> Option<SseEvent> {
        self.ready.pop_front()
    }

    /// The last event id set on the stream.
    #[cfg(test)]
    pub(crate) fn last_event_id(&self) -> Option<&str> {
        self.id.as_deref()
    }

    fn push_line_bytes(&mut self, bytes: &[u8]) -> Result<(), TooLong> {
        if self.line.len() + bytes.len() > SSE_EVENT_BYTES_MAX {
            return Err(TooLong);
        }
        self.line.extend_from_slice(bytes);
        Ok(())
    }

    /// Interprets one whole line.
    fn line(&mut self, line: &str) -> Result<(), TooLong> {
        if line.is_empty() {
            self.dispatch();
            return Ok(());
        }
        if line.starts_with(':') {
            return Ok(());
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "event" => self.event = Some(value.to_owned()),
            "data" => {
                if self.data.len() + value.len() + 1 > SSE_EVENT_BYTES_MAX {
                    return Err(TooLong);
                }
                self.data.push_str(value);
                self.data.push('\n');
                self.has_data = true;
            }
            // An id with a NUL is ignored, as the standard says.
            "id" if !value.contains('\0') => self.id = Some(value.to_owned()),
            _ => {}
        }
        Ok(())
    }

    /// Ends the event being read (a blank line).
    fn dispatch(&mut self) {
        let event = self.event.take();
        let mut data = std::mem::take(&mut self.data);
        if !std::mem::take(&mut self.has_data) {
            return;
        }
        data.pop(); // The `\n` after the last data line.
        let event = event.filter(|e| !e.is_empty()).unwrap_or_else(|| "message".to_owned());
        self.ready.push_back(SseEvent { event, data, id: self.id.clone() });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(event: &str, data: &str, id: Option<&str>) -> SseEvent {
        SseEvent { event: event.into(), data: data.into(), id: id.map(str::to_owned) }
    }

    /// Every event of a stream fed in the given chunks.
    fn parse(chunks: &[&[u8]]) -> Vec<SseEvent> {
        let mut parser = SseParser::new();
        let mut events = Vec::new();
        for chunk in chunks {
            parser.feed(chunk).unwrap();
            while let Some(e) = parser.next_event() {
                events.push(e);
            }
        }
        events
    }

    /// The events of `stream` fed whole, and fed cut at every possible pair of points: they
    /// must all be the same.
    fn parse_cut_everywhere(stream: &[u8]) -> Vec<SseEvent> {
        let whole = parse(&[stream]);
        for i in 0..=stream.len() {
            for j in i..=stream.len() {
                let cut = parse(&[&stream[..i], &stream[i..j], &stream[j..]]);
                assert_eq!(cut, whole, "cut at {i} and {j} of {:?}", String::from_utf8_lossy(stream));
            }
        }
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(parse(&bytes), whole, "one byte at a time");
        whole
    }

    #[test]
    fn change_events_with_ids() {
        let stream =
            b"event: change\nid: 7\ndata: {\"revision\":7}\n\nevent: change\nid: 8\ndata: {\"revision\":8}\n\n";
        assert_eq!(
            parse_cut_everywhere(stream),
            [event("change", r#"{"revision":7}"#, Some("7")), event("change", r#"{"revision":8}"#, Some("8"))]
        );
    }

    #[test]
    fn an_event_split_across_chunk_boundaries_is_whole_once_its_blank_line_arrives() {
        let mut parser = SseParser::new();
        parser.feed(b"event: cha").unwrap();
        parser.feed(b"nge\nid: 4").unwrap();
        parser.feed(b"2\ndata: {\"a\":").unwrap();
        parser.feed(b"1}\n").unwrap();
        assert_eq!(parser.next_event(), None, "no blank line yet");
        parser.feed(b"\n").unwrap();
        assert_eq!(parser.next_event(), Some(event("change", r#"{"a":1}"#, Some("42"))));
        assert_eq!(parser.next_event(), None);
    }

    #[test]
    fn comments_are_ignored() {
        let stream = b": keep-alive\n\n:\nevent: change\n: a comment inside an event\ndata: x\n\n: bye\n\n";
        assert_eq!(parse_cut_everywhere(stream), [event("change", "x", None)]);
    }

    #[test]
    fn multi_line_data_is_joined_with_newlines() {
        let stream = b"data: first\ndata:second\ndata:  third\ndata\ndata: \n\n";
        assert_eq!(parse_cut_everywhere(stream), [event("message", "first\nsecond\n third\n\n", None)]);
    }

    #[test]
    fn crlf_and_lone_cr_end_lines_even_when_cut_between_cr_and_lf() {
        let stream = b"event: change\r\ndata: a\r\rdata: b\r\n\r\nid: 3\rdata: c\r\r";
        assert_eq!(
            parse_cut_everywhere(stream),
            [event("change", "a", None), event("message", "b", None), event("message", "c", Some("3"))]
        );
        // A `\r` then a `\n` in the next chunk is one line ending, not two.
        assert_eq!(parse(&[b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"]), [event("message", "a\nb", None)]);
    }

    #[test]
    fn ids_carry_over_and_other_fields_are_ignored() {
        let stream = b"id: 5\nretry: 1000\nfoo: bar\ndata: a\n\ndata: b\n\nid\ndata: c\n\nid: x\0y\ndata: d\n\n";
        assert_eq!(
            parse_cut_everywhere(stream),
            [
                event("message", "a", Some("5")),
                event("message", "b", Some("5")),
                event("message", "c", Some("")),
                event("message", "d", Some("")),
            ]
        );
    }

    #[test]
    fn events_without_data_are_not_dispatched_and_do_not_leak_their_type() {
        let stream = b"event: compacted\n\ndata: later\n\nevent: lagged\nid: 9\n\n";
        assert_eq!(parse_cut_everywhere(stream), [event("message", "later", None)]);
        let mut parser = SseParser::new();
        parser.feed(stream).unwrap();
        assert_eq!(parser.last_event_id(), Some("9"), "an id without data still sets the last id");
    }

    #[test]
    fn an_unfinished_event_at_the_end_is_not_dispatched() {
        assert_eq!(parse_cut_everywhere(b"data: a\n\ndata: b\n"), [event("message", "a", None)]);
    }

    #[test]
    fn a_byte_order_mark_at_the_start_is_skipped_and_utf8_cut_mid_character_survives() {
        let stream = "\u{feff}event: change\ndata: café ✓\n\n".as_bytes();
        assert_eq!(parse_cut_everywhere(stream), [event("change", "café ✓", None)]);
        // Only at the very start.
        let stream = "data: a\n\n\u{feff}data: b\n\n".as_bytes();
        assert_eq!(parse_cut_everywhere(stream), [event("message", "a", None)]);
    }

    #[test]
    fn a_line_past_the_limit_is_an_error_not_unbounded_memory() {
        let mut parser = SseParser::new();
        let block = vec![b'x'; 1024 * 1024];
        parser.feed(b"data: ").unwrap();
        let mut result = Ok(());
        for _ in 0..=SSE_EVENT_BYTES_MAX / block.len() {
            result = parser.feed(&block);
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result, Err(TooLong));
    }
}
