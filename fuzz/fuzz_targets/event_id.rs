//! Event ids and `Last-Event-ID`: `EventId::parse` and its `Display`, and
//! the SSE frames the gateway writes with them.
//!
//! Input: a `Last-Event-ID` value; if it is an id, the rest of the input
//! after the first newline is event data to frame with it. Checked: an id
//! parses back from its display, the display is the input without its
//! leading zeros and surrounding white space, parse refuses what is not
//! `<digits>.<digits>` within u64, and a frame read by an SSE parser gives
//! back the id and the data (line ends as LF).
#![no_main]

use libfuzzer_sys::fuzz_target;
use ratatosk::stream::{EventId, sse_frame};
use ratatosk_fuzz::sse;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (header, payload) = text.split_once('\n').unwrap_or((text, ""));
    let parsed = EventId::parse(header);
    assert_eq!(parsed, reference(header), "{header:?}");
    let Some(id) = parsed else {
        return;
    };
    let shown = id.to_string();
    assert_eq!(EventId::parse(&shown), Some(id));
    let (stream, seq) = header.trim().split_once('.').expect("a dot");
    let unpadded = |digits: &str| match digits.trim_start_matches('0') {
        "" => "0".to_owned(),
        d => d.to_owned(),
    };
    assert_eq!(shown, format!("{}.{}", unpadded(stream), unpadded(seq)));

    for event in [None, Some("message")] {
        let frame = sse_frame(Some(id), event, payload.as_bytes());
        let frame = std::str::from_utf8(&frame).expect("a frame of text is text");
        assert!(frame.starts_with(&format!("id: {shown}\n")), "{frame:?}");
        let events = sse::parse(frame);
        let [one] = &events[..] else {
            panic!("one frame, {} events: {frame:?}", events.len());
        };
        assert_eq!(one.kind, "message");
        assert_eq!(one.data, payload.replace("\r\n", "\n").replace('\r', "\n"));
    }
});

/// What a `Last-Event-ID` of this gateway is, said another way.
fn reference(value: &str) -> Option<EventId> {
    let mut parts = value.trim().split('.');
    let (Some(stream), Some(seq), None) = (parts.next(), parts.next(), parts.next()) else {
        return None;
    };
    let number = |t: &str| {
        let digits = !t.is_empty() && t.len() <= 20 && t.bytes().all(|b| b.is_ascii_digit());
        digits.then(|| t.parse::<u64>().ok()).flatten()
    };
    Some(EventId {
        stream: number(stream)?,
        seq: number(seq)?,
    })
}
