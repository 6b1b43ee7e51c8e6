//! SwiftGMM on its bench cases (pangu-pro-moe and deepseek-v3 expert FFNs at several token
//! counts; shrunk on CPU adapters), each checked against its reference first. Tiling comes from
//! the tiling cache, measured on first use (FUSEDOPS_TILING_CACHE=off keeps it in memory).

#[path = "common/mod.rs"]
mod common;

fn bench(c: &mut criterion::Criterion) {
    common::bench_operator(c, &fusedops::ops::swiftgmm::OPERATOR)
}

criterion::criterion_group!(benches, bench);
criterion::criterion_main!(benches);
