//! MerRouter: every bench case timed with GPU timestamps (routing + dispatch layout, and the
//! combine), then the unfused baseline chain of the same cases, so the two sit side by side.

#[path = "common/mod.rs"]
mod common;

use criterion::{Criterion, Throughput};
use fusedops::gpu::Gpu;
use fusedops::ops::merrouter::OPERATOR;
use fusedops::registry::{Operator, Scale};

fn unfused(c: &mut Criterion) {
    let gpu = Gpu::new().unwrap_or_else(|e| panic!("benchmarks need a GPU adapter.\n{e}"));
    let mut group = c.benchmark_group("merrouter unfused");
    if gpu.is_cpu() {
        group.sample_size(10);
    }
    for case in OPERATOR.cases(Scale::Bench, &gpu) {
        let info = case.info();
        let prepared = case
            .prepare(&gpu)
            .unwrap_or_else(|e| panic!("{}: {e}", info.name));
        let Some(baseline) = prepared.baseline() else {
            continue;
        };
        gpu.run(|rec| prepared.record_baseline(rec))
            .unwrap_or_else(|e| panic!("{}: {e}", info.name));
        for checked in prepared.verify().expect("readback") {
            assert!(
                checked.comparison.pass,
                "{} baseline {}: {}",
                info.name,
                checked.output,
                checked.comparison.summary(&checked.shape)
            );
        }
        group.throughput(Throughput::Bytes(case.bytes()));
        group.bench_function(format!("{} [{baseline}]", info.name), |b| {
            b.iter_custom(|iters| {
                let timing = gpu
                    .time(0, iters.max(1) as usize, |rec| {
                        prepared.record_baseline(rec)
                    })
                    .expect("timing");
                std::time::Duration::from_nanos(timing.samples_ns.iter().sum::<f64>() as u64)
            })
        });
    }
    group.finish();
}

fn bench(c: &mut Criterion) {
    common::bench_operator(c, &OPERATOR);
    unfused(c);
}

criterion::criterion_group!(benches, bench);
criterion::criterion_main!(benches);
