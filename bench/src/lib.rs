//! Shared parts of the benchmark harness's two binaries:
//! - `ratatosk-loadgen`, the Rust load generator (`src/bin/loadgen.rs`);
//! - `ratatosk-stub`, a native stub MCP upstream (`src/bin/stub.rs`).
//!
//! `bench/run` (the harness) starts the systems under test and drives both.

pub mod client;
pub mod net;
pub mod stats;

/// The protocol version the load generator speaks (Streamable HTTP).
pub const PROTOCOL_VERSION: &str = "2025-11-25";

/// The text every published benchmark message carries; stream readers look
/// for it in the raw bytes, so framing (SSE, chunked encoding) does not matter.
pub const MARKER: &[u8] = b"BENCHMSG";

/// Counts the marker in `chunk`, carrying the last bytes of the previous chunk
/// in `carry` so a marker split across two reads is still found once.
pub fn count_markers(carry: &mut Vec<u8>, chunk: &[u8]) -> usize {
    let keep = MARKER.len() - 1;
    let mut joined = std::mem::take(carry);
    joined.extend_from_slice(chunk);
    let found = joined
        .windows(MARKER.len())
        .filter(|w| *w == MARKER)
        .count();
    let tail = joined.len().saturating_sub(keep);
    carry.extend_from_slice(&joined[tail..]);
    // A marker ending inside the kept tail was already counted; the tail is
    // shorter than the marker, so it cannot hold a whole one again.
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_are_counted_once_across_reads() {
        let mut carry = Vec::new();
        assert_eq!(count_markers(&mut carry, b"data: xxBENCH"), 0);
        assert_eq!(count_markers(&mut carry, b"MSG yy\n\n"), 1);
        assert_eq!(count_markers(&mut carry, b"BENCHMSG BENCHMSG"), 2);
        assert_eq!(count_markers(&mut carry, b": keep-alive\n\n"), 0);
        assert!(carry.len() < MARKER.len());
    }
}
