//! What the fuzz targets share: a runtime to drive async code, chunking of
//! a body the way a network splits it, a reference SSE parser, and the
//! stand-in identity provider the token targets check against.

use std::sync::OnceLock;

use bytes::Bytes;

pub mod idp;
pub mod sse;

/// One runtime per fuzzing process: async code runs to completion on it,
/// input by input. Two worker threads, so the stand-in identity provider
/// serves its one fetch while a target blocks on the validator.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime")
    })
}

/// Splits `body` into chunks as a network might: all of it at once for
/// seed 0, otherwise pieces of 1 to `seed` bytes, their sizes drawn from
/// the seed, so the fuzzer steers the boundaries with one byte.
pub fn chunks(body: &[u8], seed: u8) -> Vec<Bytes> {
    if seed == 0 {
        return vec![Bytes::copy_from_slice(body)];
    }
    let mut state = u32::from(seed).wrapping_mul(0x9E37_79B9) | 1;
    let mut out = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let n = (1 + state as usize % usize::from(seed)).min(rest.len());
        out.push(Bytes::copy_from_slice(&rest[..n]));
        rest = &rest[n..];
    }
    out
}
