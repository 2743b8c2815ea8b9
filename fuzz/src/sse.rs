//! A reference parser for `text/event-stream`, written from the WHATWG
//! HTML spec ("Interpreting an event stream"), to check the gateway's
//! reading of upstream answers against.

/// One dispatched event: its type (`message` unless set) and data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: String,
    pub data: String,
}

/// The events of a complete stream. Lines end at CRLF, LF or CR; a line
/// not ended, and an event not ended by an empty line, when the stream
/// ends are dropped, as the spec says.
pub fn parse(text: &str) -> Vec<Event> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut events = Vec::new();
    let mut data = String::new();
    let mut kind = String::new();
    let mut rest = text;
    while let Some(end) = rest.find(['\r', '\n']) {
        let line = &rest[..end];
        let eol = if rest[end..].starts_with("\r\n") {
            2
        } else {
            1
        };
        rest = &rest[end + eol..];
        if line.is_empty() {
            if !data.is_empty() {
                data.pop();
                let kind = if kind.is_empty() {
                    "message".into()
                } else {
                    std::mem::take(&mut kind)
                };
                events.push(Event {
                    kind,
                    data: std::mem::take(&mut data),
                });
            }
            data.clear();
            kind.clear();
            continue;
        }
        if line.starts_with(':') {
            continue;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "data" => {
                data.push_str(value);
                data.push('\n');
            }
            "event" => kind = value.to_owned(),
            _ => {}
        }
    }
    events
}

/// The JSON-RPC messages an answer carries, as the gateway reads them:
/// the data of `message` events that is not blank (priming events carry
/// none).
pub fn messages(text: &str) -> Vec<String> {
    parse(text)
        .into_iter()
        .filter(|e| e.kind == "message" && !e.data.trim().is_empty())
        .map(|e| e.data)
        .collect()
}

/// The most bytes a parser must hold between two events, whatever the
/// chunking: the longest run from the end of one empty line (or the start)
/// to the last byte before the end of the next (or to the end of the body).
/// A leading byte-order mark is no content.
pub fn longest_event(body: &[u8]) -> usize {
    let body = body.strip_prefix(b"\xEF\xBB\xBF".as_slice()).unwrap_or(body);
    let mut ends = vec![0];
    let mut line_start = 0;
    let mut i = 0;
    while i < body.len() {
        let eol = match body[i] {
            b'\r' if body.get(i + 1) == Some(&b'\n') => 2,
            b'\r' | b'\n' => 1,
            _ => {
                i += 1;
                continue;
            }
        };
        if i == line_start {
            ends.push(i + eol);
        }
        i += eol;
        line_start = i;
    }
    let between = ends.windows(2).map(|w| w[1] - w[0] - 1);
    let last = body.len() - ends[ends.len() - 1];
    between.chain([last]).max().unwrap_or(0)
}
