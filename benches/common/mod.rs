//! Shared by the criterion benches: every bench case of one operator, checked against its
//! reference first, timed with GPU timestamps through `iter_custom`, throughput in bytes.

use criterion::{Criterion, Throughput};
use fusedops::bench::gpu_duration;
use fusedops::gpu::Gpu;
use fusedops::registry::{Operator, Scale};

pub fn bench_operator(c: &mut Criterion, op: &dyn Operator) {
    let gpu = Gpu::new().unwrap_or_else(|e| panic!("benchmarks need a GPU adapter.\n{e}"));
    let mut group = c.benchmark_group(op.name());
    if gpu.is_cpu() {
        group.sample_size(10);
    }
    for case in op.cases(Scale::Bench, &gpu) {
        let info = case.info();
        let prepared = case
            .prepare(&gpu)
            .unwrap_or_else(|e| panic!("{}: {e}", info.name));
        gpu.run(|rec| prepared.record(rec))
            .unwrap_or_else(|e| panic!("{}: {e}", info.name));
        for checked in prepared.verify().expect("readback") {
            assert!(
                checked.comparison.pass,
                "{} {}: {}",
                info.name,
                checked.output,
                checked.comparison.summary(&checked.shape)
            );
        }
        group.throughput(Throughput::Bytes(case.bytes()));
        let id = format!("{} [{}]", info.name, prepared.variant());
        group.bench_function(id, |b| {
            b.iter_custom(|iters| gpu_duration(&gpu, prepared.as_ref(), iters).expect("timing"))
        });
    }
    group.finish();
}
