//! MoE layer: every bench case checked against its reference, then timed with GPU timestamps
//! through criterion (throughput in bytes: the weights streamed plus hidden in and out), then two
//! tables from the same prepared cases: the time split per step (each step is its own compute
//! pass, so the timestamps give each one's median), and the whole layer's tokens/s and GB/s
//! against the same run's copy probe.

use criterion::{Criterion, Throughput};
use fusedops::bench::gpu_duration;
use fusedops::gpu::Gpu;
use fusedops::ops::moe::OPERATOR;
use fusedops::registry::{Operator, Scale};
use fusedops::roofline::{ProbeSizes, copy_probe};
use fusedops::util::{fmt_num, text_table};

/// Warm-up and timed iterations of the step tables.
const WARMUP: usize = 3;
const ITERS: usize = 20;

fn bench(c: &mut Criterion) {
    let gpu = Gpu::new().unwrap_or_else(|e| panic!("benchmarks need a GPU adapter.\n{e}"));
    let copy_gbps = copy_probe(&gpu, &ProbeSizes::for_gpu(&gpu))
        .ok()
        .filter(|p| p.verified)
        .map(|p| p.value);
    let mut group = c.benchmark_group("moe");
    if gpu.is_cpu() {
        group.sample_size(10);
    }
    let (mut steps, mut layers) = (Vec::new(), Vec::new());
    for case in OPERATOR.cases(Scale::Bench, &gpu) {
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
        group.bench_function(info.name.clone(), |b| {
            b.iter_custom(|iters| gpu_duration(&gpu, prepared.as_ref(), iters).expect("timing"))
        });

        let timing = gpu
            .time(WARMUP, ITERS, |rec| prepared.record(rec))
            .expect("timing");
        let total_ns = timing.median_ns();
        for (label, ns) in timing.pass_labels.iter().zip(&timing.pass_median_ns) {
            steps.push(vec![
                info.name.clone(),
                label.clone(),
                format!("{:.1}", ns / 1e3),
                format!("{:.0}%", 100.0 * ns / total_ns),
            ]);
        }
        let tokens: f64 = info
            .params
            .iter()
            .find(|(k, _)| k == "tokens")
            .and_then(|(_, v)| v.parse().ok())
            .expect("moe cases name their tokens");
        let gbps = case.bytes() as f64 / total_ns;
        layers.push(vec![
            info.name.clone(),
            format!("{:.1}", total_ns / 1e3),
            format!("{:.0}", tokens / (total_ns * 1e-9)),
            fmt_num(Some(gbps)),
            fmt_num(copy_gbps.map(|copy| 100.0 * gbps / copy)),
            prepared.variant(),
        ]);
    }
    group.finish();
    println!(
        "\nMoE layer on {} ({} clock; median of {ITERS})",
        gpu.info.name,
        if gpu.caps.timestamps {
            "GPU timestamp"
        } else {
            "wall"
        }
    );
    if steps.is_empty() {
        println!("(no per-step times: the adapter has no timestamp queries)");
    } else {
        println!(
            "{}",
            text_table(&["case", "step", "median us", "share"], &steps)
        );
    }
    println!(
        "{}",
        text_table(
            &[
                "case",
                "layer us",
                "tokens/s",
                "GB/s",
                "% of copy",
                "variant"
            ],
            &layers
        )
    );
}

criterion::criterion_group!(benches, bench);
criterion::criterion_main!(benches);
