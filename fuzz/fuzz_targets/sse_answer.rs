//! An upstream's `text/event-stream` answer, read by the gateway's
//! `AnswerReader` (eventsource-stream over the capped body stream).
//!
//! Input: one byte that picks the chunk boundaries, one that picks a cap
//! (on the whole answer, `max_bytes`, or on the bytes held between two
//! events, `max_event_bytes`), then the body. Checked: the messages read
//! are those a spec-conforming SSE parser finds, whatever the chunking; a
//! body that is not UTF-8 ends in an error after the messages before the
//! bad byte; an answer over the cap ends in TooLarge and never yields more
//! than the whole body holds; the event cap refuses only a body that has
//! an event longer than it.
#![no_main]

use std::time::Duration;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use ratatosk::upstream::{AnswerReader, ReadError};
use ratatosk::upstream::ReadLimits;
use ratatosk_fuzz::{chunks, runtime, sse};

fuzz_target!(|data: &[u8]| {
    let [split, cap, body @ ..] = data else {
        return;
    };
    // One cap at a time, so that a TooLarge says which.
    let (max_bytes, max_event_bytes) = match *cap {
        255 => (usize::MAX, usize::MAX),
        c @ 128.. => (usize::MAX, (usize::from(c) - 127) * 16),
        c => ((usize::from(c) + 1) * 64, usize::MAX),
    };
    let limits = ReadLimits {
        timeout: Duration::from_secs(10),
        max_duration: Duration::from_secs(60),
        max_bytes,
        max_event_bytes,
    };
    let pieces = chunks(body, *split);
    let (read, end) = runtime().block_on(async move {
        let stream = futures::stream::iter(pieces.into_iter().map(Ok::<Bytes, std::io::Error>));
        let mut reader = AnswerReader::from_sse_body(stream, limits, "fuzz");
        let mut read = Vec::new();
        loop {
            match reader.next_message().await {
                Ok(Some(m)) => read.push(m),
                Ok(None) => return (read, None),
                Err(e) => return (read, Some(e)),
            }
        }
    });
    let read: Vec<String> = read
        .iter()
        .map(|m| String::from_utf8(m.to_vec()).expect("messages are text"))
        .collect();

    let (text, valid) = match std::str::from_utf8(body) {
        Ok(text) => (text, true),
        Err(e) => (
            std::str::from_utf8(&body[..e.valid_up_to()]).expect("the valid prefix"),
            false,
        ),
    };
    let expected = sse::messages(text);
    if let Some(ReadError::TooLarge { max, .. }) = &end
        && *max == max_event_bytes
    {
        let longest = sse::longest_event(body);
        assert!(
            longest > max_event_bytes,
            "refused for more than {max_event_bytes} bytes in an event, yet its longest holds {longest}"
        );
        assert!(
            expected.starts_with(&read),
            "read {read:?}, expected a prefix of {expected:?}"
        );
    } else if body.len() > max_bytes {
        assert!(
            matches!(end, Some(ReadError::TooLarge { .. })),
            "{} bytes over a cap of {max_bytes}: {end:?}",
            body.len()
        );
        assert!(
            expected.starts_with(&read),
            "read {read:?}, expected a prefix of {expected:?}"
        );
    } else if valid {
        assert!(end.is_none(), "a complete UTF-8 answer ended in {end:?}");
        assert_eq!(read, expected, "chunking {split}");
    } else {
        assert!(
            matches!(end, Some(ReadError::Broken { .. })),
            "an answer that is not UTF-8 ended in {end:?}"
        );
        assert!(
            expected.starts_with(&read),
            "read {read:?}, expected a prefix of {expected:?}"
        );
    }
});
