//! The cost of a rate-limit decision on one node (governor's keyed GCRA):
//! a request no limit selects, one a limit lets through, and one it
//! refuses, among 10,000 callers. Redis mode adds one script round trip
//! per decision (see README: Rate limits). Run: `cargo bench -p ratatosk --bench ratelimit`.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use ratatosk::config::RateLimitConfig;
use ratatosk::metrics::Metrics;
use ratatosk::ratelimit::{Ask, RateLimits};
use ratatosk_auth::Identity;

const CALLERS: usize = 10_000;

fn limits(yaml: &str) -> RateLimits {
    let configs: Vec<RateLimitConfig> = yaml_serde::from_str(yaml).expect("limits");
    RateLimits::new("org-1", &configs, &Metrics::new().expect("metrics")).expect("limits")
}

fn decisions(c: &mut Criterion) {
    let callers: Vec<Identity> = (0..CALLERS)
        .map(|i| {
            let mut id = Identity::anonymous("org-1");
            id.subject = format!("user-{i:05}");
            id
        })
        .collect();
    let ask = |identity| Ask {
        method: "tools/call",
        server: Some("fs"),
        tool: Some("fs__read_file"),
        identity,
    };
    // Generous enough that no caller is ever refused in the run.
    let open = limits("- {name: calls, rate: 1000000/s, burst: 1000000, methods: [tools/call]}");
    let tight = limits("- {name: calls, rate: 1/h, burst: 1, methods: [tools/call]}");
    let other = limits("- {name: lists, rate: 1/h, methods: [tools/list]}");
    for id in &callers {
        let _ = tight.check_local(&ask(id));
    }
    let mut group = c.benchmark_group("rate limit");
    let mut i = 0;
    group.bench_function("not selected", |b| {
        b.iter(|| {
            i = (i + 1) % CALLERS;
            black_box(other.check_local(&ask(&callers[i])))
        })
    });
    group.bench_function("passed (10k callers)", |b| {
        b.iter(|| {
            i = (i + 1) % CALLERS;
            black_box(open.check_local(&ask(&callers[i])))
        })
    });
    group.bench_function("refused (10k callers)", |b| {
        b.iter(|| {
            i = (i + 1) % CALLERS;
            black_box(tight.check_local(&ask(&callers[i])))
        })
    });
    group.finish();
}

criterion_group!(benches, decisions);
criterion_main!(benches);
