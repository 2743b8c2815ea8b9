//! The cost of validating a token: a cache hit, and a miss in `jwt` mode
//! (signature and claims checked locally, keys already fetched), for RS256
//! tokens as Keycloak issues them. Run: `cargo bench -p ratatosk-auth --features testing`.

use criterion::{Criterion, criterion_group, criterion_main};
use prometheus::Registry;
use ratatosk_auth::testing::FakeIdp;
use ratatosk_auth::{AuthMode, Validator};
use serde_json::json;

fn validation(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (idp, cached, uncached) = rt.block_on(async {
        let idp = FakeIdp::start_rsa().await;
        let cached = Validator::new(idp.config(), &Registry::new()).expect("validator");
        let mut no_cache = idp.config();
        no_cache.cache.enabled = false;
        let uncached = Validator::new(no_cache, &Registry::new()).expect("validator");
        (idp, cached, uncached)
    });
    let token = idp.token(json!({}));
    rt.block_on(async {
        cached.validate(&token, AuthMode::Jwt).await.expect("valid");
        uncached
            .validate(&token, AuthMode::Jwt)
            .await
            .expect("valid");
    });

    let mut group = c.benchmark_group("validate");
    group.bench_function("cached hit (jwt mode)", |b| {
        b.to_async(&rt)
            .iter(|| async { cached.validate(&token, AuthMode::Jwt).await.expect("valid") })
    });
    group.bench_function("jwt miss, RS256 (no cache)", |b| {
        b.to_async(&rt).iter(|| async {
            uncached
                .validate(&token, AuthMode::Jwt)
                .await
                .expect("valid")
        })
    });
    group.finish();
}

criterion_group!(benches, validation);
criterion_main!(benches);
