//! AMLA decode: every bench case (b = 128, h_q = 16 and 128, s_k = 4096, bf16, AMLA and multiply
//! rescale, P in f32 and f16; a variable-length batch; s_q = 2 causal), each checked first.
#[path = "common/mod.rs"]
mod common;

fn bench(c: &mut criterion::Criterion) {
    common::bench_operator(c, &fusedops::ops::amla::OPERATOR)
}

criterion::criterion_group!(benches, bench);
criterion::criterion_main!(benches);
