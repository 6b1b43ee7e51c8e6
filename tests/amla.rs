//! AMLA decode on the default adapter (lavapipe in CI): every variant against the exact f64
//! reference and against the emulation of the kernel's steps, on NaN-padded paged caches with
//! shuffled block tables; the corner cases of the issue; every error path, with nothing
//! dispatched.

mod common;

use common::{gpu, gpu_without};
use fusedops::check::{Comparison, compare};
use fusedops::error::Error;
use fusedops::gpu::{Feature, Gpu, Recorder};
use fusedops::ops::amla::cases::{exact_out_tolerance, lse_tolerance, out_tolerance, round_to};
use fusedops::ops::amla::inputs::{AmlaInputs, ColumnFill, InputSpec, Pattern};
use fusedops::ops::amla::reference::{self, AmlaStats};
use fusedops::ops::amla::{
    self, AmlaParams, AmlaPlan, AmlaShape, KvFormat, PPrecision, Rescale, Split, TileConfig, quant,
};
use fusedops::registry::{NamedTensors, Operator, Scale};
use fusedops::tensor::{DType, Tensor};

const ALL_VARIANTS: [(Rescale, PPrecision); 6] = [
    (Rescale::Amla, PPrecision::F32),
    (Rescale::Amla, PPrecision::F16),
    (Rescale::Amla, PPrecision::BF16),
    (Rescale::Multiply, PPrecision::F32),
    (Rescale::Multiply, PPrecision::F16),
    (Rescale::Multiply, PPrecision::BF16),
];

fn params(rescale: Rescale, p: PPrecision, split: Split, causal: bool) -> AmlaParams {
    AmlaParams {
        softmax_scale: None,
        causal,
        rescale,
        p_precision: p,
        split,
        kv_format: KvFormat::Float,
    }
}

fn amla16(split: Split) -> AmlaParams {
    params(Rescale::Amla, PPrecision::F16, split, false)
}

fn must_pass(what: &str, c: &Comparison, shape: &[usize]) {
    assert!(c.pass, "{what}: {}", c.summary(shape));
}

/// What one checked run produced.
struct Checked {
    x: AmlaInputs,
    got: amla::AmlaOutput,
    stats: AmlaStats,
}

/// Run on the GPU with tiles `tiles` (default: chosen from the device limits) and check against
/// both references.
fn check_with(
    g: &Gpu,
    label: &str,
    spec: &InputSpec,
    p: AmlaParams,
    seed: u64,
    tiles: Option<TileConfig>,
) -> Checked {
    let mut p = p;
    p.kv_format = spec.kv_format;
    check_inputs(
        g,
        label,
        &AmlaInputs::generate(spec, seed).unwrap(),
        p,
        tiles,
    )
}

/// [`check_with`] on given inputs.
fn check_inputs(
    g: &Gpu,
    label: &str,
    x: &AmlaInputs,
    p: AmlaParams,
    tiles: Option<TileConfig>,
) -> Checked {
    let x = x.clone();
    let shape = AmlaShape::of(&x.q, &x.kv_cache, &x.block_table, &x.cache_seqlens).unwrap();
    let tiles = tiles.unwrap_or_else(|| {
        TileConfig::choose(shape.rows(), shape.kv_dtype, g.caps.max_workgroup_storage).unwrap()
    });
    let plan = AmlaPlan::with_tiles(g, &shape, &p, tiles).unwrap();
    let schedule = plan.schedule(g, &x.block_table, &x.cache_seqlens).unwrap();
    let (q, kv) = (g.upload(&x.q).unwrap(), g.upload(&x.kv_cache).unwrap());
    let out = g.zeros(&shape.out_shape(), shape.out_dtype).unwrap();
    let lse = g.zeros(&shape.lse_shape(), DType::F32).unwrap();
    g.run(|rec| plan.record(g, rec, &schedule, &q, &kv, &out, &lse))
        .unwrap_or_else(|e| panic!("{label}: {e}"));
    let got = amla::AmlaOutput {
        out: g.download(&out).unwrap(),
        lse: g.download(&lse).unwrap(),
    };
    let exact = reference::exact(&x.q, &x.kv_cache, &x.block_table, &x.cache_seqlens, &p).unwrap();
    let emu = reference::emulate(
        &x.q,
        &x.kv_cache,
        &x.block_table,
        &x.cache_seqlens,
        &p,
        &tiles,
    )
    .unwrap();
    let (o, l) = (got.out.to_f32(), got.lse.to_f32());
    let (os, ls) = (shape.out_shape(), shape.lse_shape());
    let label = format!(
        "{label} {:?} p={:?} {:?} tn={}",
        p.rescale, p.p_precision, p.split, tiles.tile_keys
    );
    let exact_tol = exact_out_tolerance(
        p.rescale,
        plan.p_rounding(),
        reference::max_abs_v(&x.kv_cache, p.kv_format),
    );
    must_pass(
        &format!("{label} out/exact"),
        &compare(&o, &exact.out, exact_tol),
        &os,
    );
    must_pass(
        &format!("{label} lse/exact"),
        &compare(&l, &exact.lse, lse_tolerance()),
        &ls,
    );
    let emu_out = round_to(shape.out_dtype, &emu.out);
    let tol = emu.out_tolerance(shape.out_dtype);
    must_pass(
        &format!("{label} out/emulation"),
        &compare(&o, &emu_out, tol),
        &os,
    );
    must_pass(
        &format!("{label} lse/emulation"),
        &compare(&l, &emu.lse, emu.lse_tolerance()),
        &ls,
    );
    Checked {
        x,
        got,
        stats: emu.stats,
    }
}

fn check(g: &Gpu, label: &str, spec: &InputSpec, p: AmlaParams, seed: u64) -> Checked {
    check_with(g, label, spec, p, seed, None)
}

#[test]
fn variants_on_variable_lengths_with_nan_padding() {
    let g = gpu();
    // Lengths 0 and 1, lengths around and not at multiples of the page, several pages.
    let seqlens = [0, 1, 15, 16, 17, 64, 129, 203];
    let mut spec = InputSpec::new(&seqlens, 1, 16, 16, DType::BF16);
    // f32 q (so f32 out): the emulation check sees the kernel's own f32 result.
    spec.q_dtype = DType::F32;
    for (i, (rescale, p)) in ALL_VARIANTS.into_iter().enumerate() {
        for split in [Split::Off, Split::Chunk { keys: 48 }] {
            check(
                g,
                "bf16 cache",
                &spec,
                params(rescale, p, split, false),
                i as u64,
            );
        }
    }
    for dtype in [DType::F16, DType::F32] {
        spec.kv_dtype = dtype;
        check(g, "cache", &spec, amla16(Split::Chunk { keys: 32 }), 5);
        check(
            g,
            "cache",
            &spec,
            params(Rescale::Multiply, PPrecision::F32, Split::Off, false),
            6,
        );
    }
}

#[test]
fn sixteen_bit_q_and_out() {
    let g = gpu();
    for dtype in [DType::BF16, DType::F16] {
        let spec = InputSpec::new(&[33, 0, 100], 1, 16, 64, dtype);
        check(g, "16-bit out", &spec, amla16(Split::default()), 3);
        check(
            g,
            "16-bit out",
            &spec,
            params(Rescale::Multiply, PPrecision::F32, Split::Off, false),
            4,
        );
    }
}

#[test]
fn head_counts_1_16_64_128() {
    let g = gpu();
    for (h, seqlens) in [
        (1, vec![7, 300]),
        (16, vec![90]),
        (64, vec![40, 2]),
        (128, vec![77, 20]),
    ] {
        let spec = InputSpec::new(&seqlens, 1, h, 64, DType::BF16);
        let split = Split::Auto {
            target_workgroups: 8,
        };
        check(g, &format!("h={h}"), &spec, amla16(split), h as u64);
        check(
            g,
            &format!("h={h}"),
            &spec,
            params(Rescale::Multiply, PPrecision::F32, split, false),
            h as u64,
        );
    }
}

#[test]
fn causal_query_tokens_1_2_4() {
    let g = gpu();
    for s_q in [1, 2, 4] {
        // Length 1 and 3 are shorter than s_q = 4: those rows see few or no keys.
        let spec = InputSpec::new(&[1, 3, 70, 33], s_q, 8, 32, DType::BF16);
        for (rescale, p) in [
            (Rescale::Amla, PPrecision::F16),
            (Rescale::Multiply, PPrecision::F32),
        ] {
            let c = check(
                g,
                &format!("s_q={s_q} causal"),
                &spec,
                params(rescale, p, Split::Chunk { keys: 32 }, true),
                s_q as u64,
            );
            let lse = c.got.lse.to_f32();
            // Sequence 0 (1 key): token t sees 1 + t - (s_q - 1) keys, none for t < s_q - 1.
            for h in 0..8 {
                for t in 0..s_q {
                    let v = lse[h * s_q + t];
                    assert_eq!(
                        v == f32::NEG_INFINITY,
                        t + 1 < s_q,
                        "s_q={s_q} h={h} t={t}: {v}"
                    );
                }
            }
        }
    }
    // Non-causal s_q = 2 for contrast: every row sees every key.
    let spec = InputSpec::new(&[1, 50], 2, 16, 16, DType::F16);
    check(g, "s_q=2 not causal", &spec, amla16(Split::Off), 9);
}

#[test]
fn rising_max_hits_the_minus_30_clamp() {
    let g = gpu();
    // Scores rise 2.5 binades per key (every tile lifts the max by 20 to 80 binades), then 10
    // per key: a jump of 160+ binades per tile, which would wrap even O entries near 1 without
    // the clamp.
    for (ramp, variants) in [(2.5, &ALL_VARIANTS[..]), (10.0, &ALL_VARIANTS[..3])] {
        let mut spec = InputSpec::new(&[300, 130], 1, 16, 64, DType::BF16);
        spec.pattern = Pattern {
            ramp_log2_per_key: ramp,
            column: None,
        };
        for &(rescale, p) in variants {
            for split in [Split::Off, Split::Chunk { keys: 96 }] {
                let label = format!("rising max {ramp}");
                let c = check(g, &label, &spec, params(rescale, p, split, false), 11);
                if rescale == Rescale::Amla {
                    let s = c.stats;
                    assert!(
                        s.clamped_steps > 0 && 2 * s.clamped_steps > s.exponent_steps,
                        "{s:?}"
                    );
                }
            }
        }
    }
}

#[test]
fn slow_rise_steps_the_exponent_every_tile() {
    let g = gpu();
    // The max grows a little in every tile, so every tile applies a small exponent step with
    // its rounding compensation; with f16 P some O entries cancel to exactly 0 on the way.
    let mut spec = InputSpec::new(&[400, 300, 350], 1, 16, 64, DType::BF16);
    spec.q_dtype = DType::F32;
    for ramp in [0.02, 0.1] {
        spec.pattern = Pattern {
            ramp_log2_per_key: ramp,
            column: None,
        };
        for p in [PPrecision::F16, PPrecision::F32] {
            let c = check(
                g,
                &format!("ramp {ramp}"),
                &spec,
                params(Rescale::Amla, p, Split::Off, false),
                5,
            );
            assert!(
                c.stats.exponent_steps > c.stats.tiles * 9 / 10,
                "{:?}",
                c.stats
            );
        }
    }
}

#[test]
fn zero_and_denormal_v_columns() {
    let g = gpu();
    // A mild ramp makes the max grow in every tile (about 5 binades per 16 keys, 45 in all).
    // (a) V column 7 is 0 in the first 40 keys: O is exactly 0 there while the exponent steps
    // go on, then gets contributions; AMLA's add must leave the zero alone, or it wraps, swallows
    // the later contributions and the guard zeroes the entry. (b) column 7 = 1e-39 in every key
    // (a denormal bf16 holds): O is denormal there and the add must leave it alone too (the
    // true value is about 1e-39). (c) the same without the ramp: random scores make exponent
    // steps of -1, which turned the denormal 0x000AE3A0 into the NaN pattern 0xFF8AE3A8.
    let mut spec = InputSpec::new(&[150, 97, 0], 1, 16, 128, DType::BF16);
    spec.q_dtype = DType::F32;
    for (ramp, value, keys) in [
        (0.3, 0.0, 40),
        (0.3, 1e-39, usize::MAX),
        (0.0, 1e-39, usize::MAX),
    ] {
        spec.pattern = Pattern {
            ramp_log2_per_key: ramp,
            column: Some(ColumnFill {
                column: 7,
                value,
                keys,
            }),
        };
        for p in [PPrecision::F32, PPrecision::F16, PPrecision::BF16] {
            for split in [Split::Off, Split::Chunk { keys: 64 }] {
                let label = format!("ramp {ramp} column {value:e}");
                let c = check(g, &label, &spec, params(Rescale::Amla, p, split, false), 12);
                assert_eq!(
                    c.stats.denormals_kept > 0,
                    value != 0.0,
                    "{label}: {:?}",
                    c.stats
                );
                let column: Vec<f32> = c.got.out.to_f32().chunks(512).map(|row| row[7]).collect();
                if value == 0.0 {
                    assert!(column[..32].iter().all(|&v| v != 0.0), "{label}");
                } else {
                    assert!(column.iter().all(|v| v.abs() <= 1e-30), "{label}");
                }
            }
        }
    }
}

#[test]
fn long_sequences_take_hundreds_of_tiles() {
    let g = gpu();
    // 256+ tiles per sequence: a drift of a few ulps per tile (e.g. applying the 1e-6 of the
    // exponent step in tiles where the max did not change) would show against the emulation.
    let mut spec = InputSpec::new(&[4100, 2500], 1, 4, 64, DType::BF16);
    spec.q_dtype = DType::F32;
    for (rescale, p) in ALL_VARIANTS {
        check(g, "long", &spec, params(rescale, p, Split::Off, false), 21);
    }
    check(g, "long split", &spec, amla16(Split::default()), 22);
}

#[test]
fn empty_sequences_give_zero_and_minus_infinity() {
    let g = gpu();
    let spec = InputSpec::new(&[0, 5, 0, 40], 1, 16, 16, DType::BF16);
    for split in [Split::Off, Split::Chunk { keys: 16 }] {
        for (rescale, p) in [
            (Rescale::Amla, PPrecision::F16),
            (Rescale::Multiply, PPrecision::F32),
        ] {
            let c = check(g, "empty", &spec, params(rescale, p, split, false), 13);
            let (out, lse) = (c.got.out.to_f32(), c.got.lse.to_f32());
            for seq in [0, 2] {
                assert!(
                    out[seq * 16 * 512..(seq + 1) * 16 * 512]
                        .iter()
                        .all(|&v| v == 0.0)
                );
                assert!(
                    lse[seq * 16..(seq + 1) * 16]
                        .iter()
                        .all(|&v| v == f32::NEG_INFINITY)
                );
            }
            assert!(lse[16..32].iter().all(|v| v.is_finite()));
        }
    }
    // A batch of nothing but empty sequences.
    let spec = InputSpec::new(&[0, 0], 1, 4, 64, DType::F16);
    let c = check(g, "all empty", &spec, amla16(Split::default()), 14);
    assert!(c.got.out.to_f32().iter().all(|&v| v == 0.0));
    assert_eq!(c.x.cache_seqlens.as_i32(), Some(&[0, 0][..]));
}

#[test]
fn page_sizes_and_shuffled_tables() {
    let g = gpu();
    for page in [16, 64, 128, 256] {
        let mut spec = InputSpec::new(&[page + 3, 2 * page - 1, 5], 1, 4, page, DType::BF16);
        spec.spare_blocks = 3;
        spec.spare_columns = 2;
        check(
            g,
            &format!("page {page}"),
            &spec,
            amla16(Split::Chunk { keys: 64 }),
            page as u64,
        );
    }
}

#[test]
fn every_key_tile_size_that_fits() {
    let g = gpu();
    let spec = InputSpec::new(&[45, 100], 1, 16, 16, DType::BF16);
    let narrow = InputSpec::new(&[45, 100], 2, 2, 16, DType::F16);
    // Head block 8 for 16 rows is what a device with 16 KiB of workgroup memory gets.
    for (spec, head_block) in [(&spec, 16), (&spec, 8), (&narrow, 4)] {
        for tn in [8, 16, 32] {
            let tiles = TileConfig::new(head_block, tn, spec.kv_dtype).unwrap();
            if tiles.workgroup_bytes > g.caps.max_workgroup_storage {
                // Too big for this device: refused before anything runs.
                let x = AmlaInputs::generate(spec, 1).unwrap();
                let shape =
                    AmlaShape::of(&x.q, &x.kv_cache, &x.block_table, &x.cache_seqlens).unwrap();
                let err = AmlaPlan::with_tiles(g, &shape, &amla16(Split::Off), tiles).unwrap_err();
                assert!(matches!(err, Error::Limit { .. }), "{err}");
                continue;
            }
            let split = Split::Chunk { keys: 24 };
            check_with(
                g,
                &format!("hb={head_block}"),
                spec,
                amla16(split),
                15,
                Some(tiles),
            );
            let multiply = params(Rescale::Multiply, PPrecision::F32, split, true);
            check_with(
                g,
                &format!("hb={head_block}"),
                spec,
                multiply,
                16,
                Some(tiles),
            );
        }
    }
}

#[test]
fn auto_split_balances_a_mixed_batch() {
    let g = gpu();
    let spec = InputSpec::new(&[600, 3, 4, 17, 9], 1, 16, 64, DType::BF16);
    let x = AmlaInputs::generate(&spec, 17).unwrap();
    let shape = AmlaShape::of(&x.q, &x.kv_cache, &x.block_table, &x.cache_seqlens).unwrap();
    let p = amla16(Split::Auto {
        target_workgroups: 16,
    });
    let plan = AmlaPlan::new(g, &shape, &p).unwrap();
    let schedule = plan.schedule(g, &x.block_table, &x.cache_seqlens).unwrap();
    let work = schedule.work();
    assert!(work.ranges[0].len() > 4, "{:?}", work.ranges[0]);
    assert!(work.ranges[1..].iter().all(|r| r.len() == 1));
    assert!(!work.combines.is_empty());
    check(g, "auto split", &spec, p, 17);
}

#[test]
fn one_plan_serves_many_schedules_and_layers() {
    let g = gpu();
    let spec = InputSpec::new(&[70, 5], 1, 16, 16, DType::BF16);
    let a = AmlaInputs::generate(&spec, 1).unwrap();
    // The next step: other lengths (within the same pages) and another q, same shapes.
    let b = AmlaInputs {
        q: AmlaInputs::generate(&spec, 2).unwrap().q,
        cache_seqlens: Tensor::i32(&[2], vec![60, 3]).unwrap(),
        ..a.clone()
    };
    let p = amla16(Split::Chunk { keys: 32 });
    let shape = AmlaShape::of(&a.q, &a.kv_cache, &a.block_table, &a.cache_seqlens).unwrap();
    let plan = AmlaPlan::new(g, &shape, &p).unwrap();
    let sched_a = plan.schedule(g, &a.block_table, &a.cache_seqlens).unwrap();
    let sched_b = plan.schedule(g, &b.block_table, &b.cache_seqlens).unwrap();
    let dev = |x: &AmlaInputs| (g.upload(&x.q).unwrap(), g.upload(&x.kv_cache).unwrap());
    let ((qa, kva), (qb, kvb)) = (dev(&a), dev(&b));
    let outs: Vec<_> = (0..2)
        .map(|_| {
            (
                g.zeros(&shape.out_shape(), shape.out_dtype).unwrap(),
                g.zeros(&shape.lse_shape(), DType::F32).unwrap(),
            )
        })
        .collect();
    // Two "layers" in one command buffer, sharing the plan's workspace.
    g.run(|rec| {
        plan.record(g, rec, &sched_a, &qa, &kva, &outs[0].0, &outs[0].1)?;
        plan.record(g, rec, &sched_b, &qb, &kvb, &outs[1].0, &outs[1].1)
    })
    .unwrap();
    for (x, (out, lse)) in [&a, &b].into_iter().zip(&outs) {
        let exact =
            reference::exact(&x.q, &x.kv_cache, &x.block_table, &x.cache_seqlens, &p).unwrap();
        let o = g.download_f32(out).unwrap();
        must_pass(
            "layer out",
            &compare(&o, &exact.out, out_tolerance()),
            &shape.out_shape(),
        );
        let l = g.download_f32(lse).unwrap();
        must_pass(
            "layer lse",
            &compare(&l, &exact.lse, lse_tolerance()),
            &shape.lse_shape(),
        );
    }
    // A schedule belongs to its plan.
    let other = AmlaPlan::new(g, &shape, &p).unwrap();
    let mut encoder = g.device.create_command_encoder(&Default::default());
    let mut rec = Recorder::new(&mut encoder);
    let err = other
        .record(g, &mut rec, &sched_a, &qa, &kva, &outs[0].0, &outs[0].1)
        .unwrap_err();
    assert!(matches!(err, Error::Invalid { .. }), "{err}");
    assert!(rec.pass_labels().is_empty());
}

#[test]
fn plain_path_without_optional_features() {
    let g = gpu_without(&[
        Feature::Subgroups,
        Feature::ShaderF16,
        Feature::CooperativeMatrix,
    ]);
    let spec = InputSpec::new(&[20, 66], 2, 16, 16, DType::F16);
    check(
        &g,
        "no features",
        &spec,
        params(Rescale::Amla, PPrecision::F16, Split::default(), true),
        18,
    );
    let paths = fusedops::ops::amla::OPERATOR.paths(&g);
    assert!(
        paths
            .iter()
            .any(|(what, how)| what == "reductions" && how.contains("any subgroup size"))
    );
    assert!(
        paths
            .iter()
            .any(|(what, how)| what.starts_with("decode") && how.contains("f32 SIMT"))
    );
}

// ---- errors: typed, before anything is recorded ----

fn good() -> AmlaInputs {
    AmlaInputs::generate(&InputSpec::new(&[20, 33], 1, 4, 16, DType::BF16), 19).unwrap()
}

fn run_host(x: &AmlaInputs) -> Result<amla::AmlaOutput, Error> {
    amla::amla(
        gpu(),
        &x.q,
        &x.kv_cache,
        &x.block_table,
        &x.cache_seqlens,
        &AmlaParams::default(),
    )
}

fn with_table(x: &AmlaInputs, edit: impl FnOnce(&mut Vec<i32>)) -> AmlaInputs {
    let mut table = x.block_table.as_i32().unwrap().to_vec();
    edit(&mut table);
    AmlaInputs {
        block_table: Tensor::i32(x.block_table.shape(), table).unwrap(),
        ..x.clone()
    }
}

fn bf16(shape: &[usize]) -> Tensor {
    Tensor::zeros(shape, DType::BF16).unwrap()
}

#[test]
fn bad_indices_are_typed_errors() {
    let x = good();
    let width = x.block_table.shape()[1];
    // A used block id out of range, negative, and a length beyond its row's pages.
    let num_blocks = x.kv_cache.shape()[0] as i32;
    let out_of_range = with_table(&x, |t| t[width] = num_blocks);
    assert!(matches!(
        run_host(&out_of_range),
        Err(Error::Invalid { .. })
    ));
    let negative = with_table(&x, |t| t[0] = -1);
    assert!(matches!(run_host(&negative), Err(Error::Invalid { .. })));
    let too_long = AmlaInputs {
        cache_seqlens: Tensor::i32(&[2], vec![20, (width * 16 + 1) as i32]).unwrap(),
        ..x.clone()
    };
    assert!(matches!(run_host(&too_long), Err(Error::Invalid { .. })));
    let negative_len = AmlaInputs {
        cache_seqlens: Tensor::i32(&[2], vec![-3, 4]).unwrap(),
        ..x.clone()
    };
    assert!(matches!(
        run_host(&negative_len),
        Err(Error::Invalid { .. })
    ));
    // Unused entries may hold anything (vLLM pads with -1).
    let padded = with_table(&x, |t| t[width - 1] = -7);
    run_host(&padded).unwrap();
}

#[test]
fn bad_shapes_and_dtypes_are_typed_errors() {
    let x = good();
    let cases: Vec<(&str, AmlaInputs)> = vec![
        (
            "q head dim 512",
            AmlaInputs {
                q: bf16(&[2, 1, 4, 512]),
                ..x.clone()
            },
        ),
        (
            "cache head dim 512",
            AmlaInputs {
                kv_cache: bf16(&[9, 16, 512]),
                ..x.clone()
            },
        ),
        (
            "q batch 3",
            AmlaInputs {
                q: bf16(&[3, 1, 4, 576]),
                ..x.clone()
            },
        ),
        (
            "seqlens batch 3",
            AmlaInputs {
                cache_seqlens: Tensor::i32(&[3], vec![1, 1, 1]).unwrap(),
                ..x.clone()
            },
        ),
        (
            "block table batch 1",
            AmlaInputs {
                block_table: Tensor::i32(&[1, 3], vec![0, 1, 2]).unwrap(),
                ..x.clone()
            },
        ),
    ];
    for (what, bad) in cases {
        assert!(matches!(run_host(&bad), Err(Error::Shape { .. })), "{what}");
    }
    for page in [0, 8, 48] {
        let bad = AmlaInputs {
            kv_cache: bf16(&[9, page, 576]),
            ..x.clone()
        };
        assert!(
            matches!(run_host(&bad), Err(Error::Invalid { .. })),
            "page {page}"
        );
    }
    let f32_table = AmlaInputs {
        block_table: Tensor::f32(x.block_table.shape(), vec![0.0; x.block_table.numel()]).unwrap(),
        ..x.clone()
    };
    assert!(matches!(
        run_host(&f32_table),
        Err(Error::Unsupported { .. })
    ));
    let int_q = AmlaInputs {
        q: Tensor::zeros(&[2, 1, 4, 576], DType::I32).unwrap(),
        ..x.clone()
    };
    assert!(matches!(run_host(&int_q), Err(Error::Unsupported { .. })));
    let bad_scale = AmlaParams {
        softmax_scale: Some(f32::NAN),
        ..AmlaParams::default()
    };
    let err = amla::amla(
        gpu(),
        &x.q,
        &x.kv_cache,
        &x.block_table,
        &x.cache_seqlens,
        &bad_scale,
    );
    assert!(matches!(err, Err(Error::Invalid { .. })));
    let zero_target = amla16(Split::Auto {
        target_workgroups: 0,
    });
    let err = amla::amla(
        gpu(),
        &x.q,
        &x.kv_cache,
        &x.block_table,
        &x.cache_seqlens,
        &zero_target,
    );
    assert!(matches!(err, Err(Error::Invalid { .. })));
}

#[test]
fn bad_device_tensors_record_nothing_and_leave_the_output_alone() {
    let g = gpu();
    let x = good();
    let shape = AmlaShape::of(&x.q, &x.kv_cache, &x.block_table, &x.cache_seqlens).unwrap();
    let plan = AmlaPlan::new(g, &shape, &AmlaParams::default()).unwrap();
    let schedule = plan.schedule(g, &x.block_table, &x.cache_seqlens).unwrap();
    let q = g.upload(&x.q).unwrap();
    let kv = g.upload(&x.kv_cache).unwrap();
    let sentinel =
        Tensor::from_f32(&shape.out_shape(), &vec![7.0; 2 * 4 * 512], DType::BF16).unwrap();
    let out = g.upload(&sentinel).unwrap();
    let lse = g.zeros(&shape.lse_shape(), DType::F32).unwrap();
    let wrong_out = g.zeros(&[2, 1, 4, 576], DType::BF16).unwrap();
    let wrong_lse = g.zeros(&shape.lse_shape(), DType::F16).unwrap();
    let wrong_q = g
        .upload(&Tensor::zeros(&[2, 1, 4, 576], DType::F16).unwrap())
        .unwrap();
    let wrong_kv = g.upload(&bf16(&[9, 16, 512])).unwrap();
    let attempts = [
        (&q, &kv, &wrong_out, &lse),
        (&q, &kv, &out, &wrong_lse),
        (&wrong_q, &kv, &out, &lse),
        (&q, &wrong_kv, &out, &lse),
    ];
    for (i, (q, kv, o, l)) in attempts.into_iter().enumerate() {
        let err = g.run(|rec| {
            let r = plan.record(g, rec, &schedule, q, kv, o, l);
            assert!(rec.pass_labels().is_empty(), "attempt {i} recorded a pass");
            r
        });
        assert!(
            matches!(err, Err(Error::Shape { .. } | Error::Unsupported { .. })),
            "{i}: {err:?}"
        );
    }
    assert_eq!(g.download(&out).unwrap(), sentinel);
    // A schedule is validated against the plan's shapes.
    let wide = Tensor::i32(&[2, 7], vec![0; 14]).unwrap();
    assert!(matches!(
        plan.schedule(g, &wide, &x.cache_seqlens),
        Err(Error::Shape { .. })
    ));
}

// ---- registry ----

#[test]
fn registry_ci_cases_pass() {
    let g = gpu();
    let op = &fusedops::ops::amla::OPERATOR;
    let cases = op.cases(Scale::Ci, g);
    assert!(cases.len() >= 6);
    for case in &cases {
        let row = fusedops::bench::check_case(case.as_ref(), g);
        assert!(row.pass, "{}: {}", row.case.name, row.summary());
        assert_eq!(row.checks.len(), 4);
        assert!(case.bytes() > 0 && case.flops() > 0);
    }
    let bench = op.cases(Scale::Bench, g);
    assert!(
        bench
            .iter()
            .any(|c| c.info().params.contains(&("h_q".into(), "128".into())))
    );
}

#[test]
fn run_named_matches_reference_named() {
    let g = gpu();
    let op = &fusedops::ops::amla::OPERATOR;
    let x = AmlaInputs::generate(&InputSpec::new(&[30, 9], 2, 4, 16, DType::F32), 20).unwrap();
    let inputs = NamedTensors::from([
        ("q".to_string(), x.q.clone()),
        ("kv_cache".to_string(), x.kv_cache.clone()),
        ("block_table".to_string(), x.block_table.clone()),
        ("cache_seqlens".to_string(), x.cache_seqlens.clone()),
    ]);
    let params = serde_json::json!({
        "causal": true, "rescale": "multiply", "p_precision": "f16", "split": {"chunk": 16}
    });
    let got = op.run_named(g, &inputs, &params).unwrap();
    let want = op.reference_named(&inputs, &params).unwrap();
    for name in ["out", "lse"] {
        let c = compare(
            &got[name].to_f32(),
            &want[name].to_f32(),
            op.tolerance(name, &inputs, &params),
        );
        must_pass(name, &c, got[name].shape());
    }
    let bad = serde_json::json!({"split": "sideways"});
    assert!(matches!(
        op.run_named(g, &inputs, &bad),
        Err(Error::Format { .. })
    ));
    let unknown = serde_json::json!({"scale": 1.0});
    assert!(matches!(
        op.run_named(g, &inputs, &unknown),
        Err(Error::Format { .. })
    ));
    let missing = NamedTensors::from([("q".to_string(), x.q.clone())]);
    assert!(matches!(
        op.run_named(g, &missing, &serde_json::Value::Null),
        Err(Error::Invalid { .. })
    ));
}

#[test]
fn run_named_takes_a_packed_cache_saved_as_fp8() {
    // FlashMLA's quantizer leaves a float8_e4m3fn tensor [blocks, page, 1, 656]; saved with
    // safetensors it loads as u8 and runs with "kv_format": "fp8".
    let g = gpu();
    let op = &fusedops::ops::amla::OPERATOR;
    let spec = InputSpec::new(&[30, 9], 1, 16, 16, DType::BF16).quantized(KvFormat::Fp8);
    let x = AmlaInputs::generate(&spec, 21).unwrap();
    let [n, page, w] = [x.kv_cache.shape()[0], x.kv_cache.shape()[1], 656];
    let view = safetensors::tensor::TensorView::new(
        safetensors::Dtype::F8_E4M3,
        vec![n, page, 1, w],
        x.kv_cache.bytes(),
    )
    .unwrap();
    let file = safetensors::tensor::serialize([("kv_cache", view)], None).unwrap();
    let mut inputs = fusedops::io::parse(std::path::Path::new("mem"), &file).unwrap();
    assert_eq!(inputs["kv_cache"].dtype(), DType::U8);
    inputs.insert("q".into(), x.q.clone());
    inputs.insert("block_table".into(), x.block_table.clone());
    inputs.insert("cache_seqlens".into(), x.cache_seqlens.clone());
    let params = serde_json::json!({"kv_format": "fp8", "p_precision": "cache"});
    let got = op.run_named(g, &inputs, &params).unwrap();
    let want = op.reference_named(&inputs, &params).unwrap();
    for name in ["out", "lse"] {
        let c = compare(
            &got[name].to_f32(),
            &want[name].to_f32(),
            op.tolerance(name, &inputs, &params),
        );
        must_pass(name, &c, got[name].shape());
    }
    // Without the format the u8 cache is refused, naming the parameter.
    let err = op
        .run_named(g, &inputs, &serde_json::Value::Null)
        .unwrap_err();
    assert!(err.to_string().contains("kv_format"), "{err}");
}

// ---- hand-built plan inputs (AmlaShape and TileConfig have public fields) ----

#[test]
fn hand_built_shapes_are_validated_by_the_plan() {
    let g = gpu();
    let x = good();
    let shape = AmlaShape::of(&x.q, &x.kv_cache, &x.block_table, &x.cache_seqlens).unwrap();
    let p = AmlaParams::default();
    // A page size of 0 would divide by zero in the schedule; one that is not a power of two
    // would make the kernel's page shift read other rows of the block table.
    let bad = [
        AmlaShape {
            page_size: 0,
            ..shape
        },
        AmlaShape {
            page_size: 48,
            ..shape
        },
        AmlaShape {
            num_blocks: 0,
            ..shape
        },
        AmlaShape {
            max_blocks: 0,
            ..shape
        },
        AmlaShape { batch: 0, ..shape },
        AmlaShape { h_q: 0, ..shape },
        AmlaShape {
            q_dtype: DType::I32,
            ..shape
        },
        AmlaShape {
            kv_dtype: DType::U32,
            ..shape
        },
    ];
    for s in bad {
        let err = AmlaPlan::new(g, &s, &p).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Shape { .. } | Error::Invalid { .. } | Error::Unsupported { .. }
            ),
            "{s:?}: {err}"
        );
    }
}

#[test]
fn hand_built_tile_configs_are_refused() {
    let g = gpu();
    let x = good();
    let shape = AmlaShape::of(&x.q, &x.kv_cache, &x.block_table, &x.cache_seqlens).unwrap();
    let p = AmlaParams::default();
    let tiles = TileConfig::new(4, 16, shape.kv_dtype).unwrap();
    AmlaPlan::with_tiles(g, &shape, &p, tiles).unwrap();
    // Fields that do not come from TileConfig::new: a head block past the kernel's 16 register
    // rows, rows per thread past its 8, a workgroup-memory size that understates the kernel's.
    let bad = [
        TileConfig {
            head_block: 32,
            ..tiles
        },
        TileConfig {
            rows_per_thread: 16,
            ..tiles
        },
        TileConfig {
            d_groups: 3,
            ..tiles
        },
        TileConfig {
            workgroup_bytes: 16,
            ..tiles
        },
        TileConfig {
            kv_stride: 1,
            ..tiles
        },
    ];
    for t in bad {
        let err = AmlaPlan::with_tiles(g, &shape, &p, t).unwrap_err();
        assert!(matches!(err, Error::Invalid { .. }), "{t:?}: {err}");
    }
    // The emulation takes tiles too (a zero-key tile would divide by zero).
    let zero_keys = TileConfig {
        tile_keys: 0,
        ..tiles
    };
    let emulated = |t: &TileConfig| {
        reference::emulate(&x.q, &x.kv_cache, &x.block_table, &x.cache_seqlens, &p, t)
    };
    assert!(matches!(emulated(&zero_keys), Err(Error::Invalid { .. })));
    emulated(&tiles).unwrap();
}

#[test]
fn the_largest_chunk_is_one_split() {
    // u32::MAX keys round up to 2^32 (a whole number of tiles): that must not wrap to 0.
    let spec = InputSpec::new(&[45, 3], 1, 4, 16, DType::BF16);
    let p = amla16(Split::Chunk { keys: u32::MAX });
    let checked = check(gpu(), "chunk u32::MAX", &spec, p, 23);
    let shape = AmlaShape::of(
        &checked.x.q,
        &checked.x.kv_cache,
        &checked.x.block_table,
        &checked.x.cache_seqlens,
    )
    .unwrap();
    let plan = AmlaPlan::new(gpu(), &shape, &p).unwrap();
    let schedule = plan
        .schedule(gpu(), &checked.x.block_table, &checked.x.cache_seqlens)
        .unwrap();
    assert!(schedule.work().combines.is_empty());
}

#[test]
fn index_slices_of_the_wrong_length_are_errors() {
    let x = good();
    let shape = AmlaShape::of(&x.q, &x.kv_cache, &x.block_table, &x.cache_seqlens).unwrap();
    let table = x.block_table.as_i32().unwrap();
    let lens = x.cache_seqlens.as_i32().unwrap();
    assert!(matches!(
        shape.validate_indices(&table[1..], lens),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        shape.validate_indices(table, &lens[1..]),
        Err(Error::Shape { .. })
    ));
    assert_eq!(shape.validate_indices(table, lens).unwrap(), vec![20, 33]);
}

// ---- NaN and infinities: they reach exactly the rows the exact reference says ----

/// Where the poisoned inputs are, in a batch of `[40, 37, 20, 50, 45, 0]` keys with s_q = 2
/// (causal), h_q = 4: rows are (token, head), row = token * 4 + head.
const POISON_LENS: [usize; 6] = [40, 37, 20, 50, 45, 0];

/// The cache row (block * page + slot) of key `k` of sequence `seq`.
fn cache_row(x: &AmlaInputs, seq: usize, k: usize) -> usize {
    let page = x.kv_cache.shape()[1];
    let width = x.block_table.shape()[1];
    x.block_table.as_i32().unwrap()[seq * width + k / page] as usize * page + k % page
}

/// Set value `d` of cache row `row` to `v` (float cache), or poison it the 8-bit way: a NaN
/// code (FP8) or a non-finite scale (int8) for `d < 512`, the bf16 rope value otherwise.
fn poison_cache(x: &mut AmlaInputs, format: KvFormat, row: usize, d: usize, v: f32) {
    match format {
        KvFormat::Float => {
            let mut values = x.kv_cache.to_f32();
            values[row * 576 + d] = v;
            x.kv_cache = Tensor::from_f32(x.kv_cache.shape(), &values, x.kv_cache.dtype()).unwrap();
        }
        _ => {
            let mut bytes = x.kv_cache.as_u8().unwrap().to_vec();
            let r = &mut bytes[row * quant::ROW_BYTES..(row + 1) * quant::ROW_BYTES];
            if d >= 512 {
                let at = quant::ROPE_AT + 2 * (d - 512);
                r[at..at + 2].copy_from_slice(&half::bf16::from_f32(v).to_le_bytes());
            } else if format == KvFormat::Fp8 {
                r[d] = if v.is_sign_negative() { 0xff } else { 0x7f };
            } else {
                let at = quant::SCALES_AT + 4 * (d / quant::GROUP);
                r[at..at + 4].copy_from_slice(&v.to_le_bytes());
            }
            x.kv_cache = Tensor::u8(x.kv_cache.shape(), bytes).unwrap();
        }
    }
}

fn poisoned_inputs(format: KvFormat, seed: u64) -> AmlaInputs {
    let mut spec = InputSpec::new(&POISON_LENS, 2, 4, 16, DType::BF16);
    if format != KvFormat::Float {
        spec = spec.quantized(format);
    }
    let mut x = AmlaInputs::generate(&spec, seed).unwrap();
    // q: NaN in sequence 0 (token 0, head 1), +inf in sequence 3 (token 1, head 2).
    let mut q = x.q.to_f32();
    q[576 + 100] = f32::NAN;
    q[((3 * 2 + 1) * 4 + 2) * 576 + 7] = f32::INFINITY;
    x.q = Tensor::from_f32(x.q.shape(), &q, x.q.dtype()).unwrap();
    // The last key of sequence 1: only its token 1 sees it (causal). A rope value of a key of
    // sequence 4 that every row sees.
    let row = cache_row(&x, 1, 36);
    poison_cache(&mut x, format, row, 5, f32::NAN);
    let row = cache_row(&x, 4, 10);
    poison_cache(&mut x, format, row, 530, f32::NEG_INFINITY);
    x
}

/// Rows (per sequence, row = token * 4 + head) that must come out NaN.
fn expected_nan_rows(seq: usize) -> Vec<usize> {
    match seq {
        0 => vec![1],
        1 => vec![4, 5, 6, 7],
        3 => vec![6],
        4 => (0..8).collect(),
        _ => vec![],
    }
}

fn assert_nan_rows(label: &str, got: &amla::AmlaOutput) {
    let out = got.out.to_f32();
    let lse = got.lse.to_f32();
    for (seq, &len) in POISON_LENS.iter().enumerate() {
        let nan_rows = expected_nan_rows(seq);
        for row in 0..8 {
            let o = &out[(seq * 8 + row) * 512..][..512];
            let (token, head) = (row / 4, row % 4);
            let l = lse[(seq * 4 + head) * 2 + token];
            if nan_rows.contains(&row) {
                assert!(
                    o.iter().all(|v| v.is_nan()) && l.is_nan(),
                    "{label} {seq} {row}"
                );
            } else if len == 0 {
                assert!(
                    o.iter().all(|&v| v == 0.0) && l == f32::NEG_INFINITY,
                    "{label}"
                );
            } else {
                assert!(
                    o.iter().all(|v| v.is_finite()) && l.is_finite(),
                    "{label} {seq} {row}"
                );
            }
        }
    }
}

#[test]
fn nan_and_inf_reach_exactly_the_rows_that_see_them() {
    let g = gpu();
    let x = poisoned_inputs(KvFormat::Float, 40);
    // Every variant, split and unsplit (the split one goes through the combine).
    for (rescale, p) in ALL_VARIANTS {
        for split in [Split::Off, Split::Chunk { keys: 16 }] {
            let c = check_inputs(g, "poisoned", &x, params(rescale, p, split, true), None);
            assert_nan_rows(&format!("{rescale:?} {p:?} {split:?}"), &c.got);
        }
    }
}

#[test]
fn nan_codes_scales_and_rope_values_of_8_bit_caches_propagate() {
    let g = gpu();
    for format in [KvFormat::Fp8, KvFormat::Int8] {
        let x = poisoned_inputs(format, 41);
        for (rescale, p) in [
            (Rescale::Amla, PPrecision::Cache),
            (Rescale::Multiply, PPrecision::F32),
        ] {
            for split in [Split::Off, Split::Chunk { keys: 16 }] {
                let mut pp = params(rescale, p, split, true);
                pp.kv_format = format;
                let c = check_inputs(g, "poisoned 8-bit", &x, pp, None);
                assert_nan_rows(&format!("{format:?} {rescale:?} {split:?}"), &c.got);
            }
        }
    }
}

// ---- 8-bit caches ----

/// An E4M3 decoder written independently of the library's: (-1)^s 2^(e - 7) (1 + m/8), or
/// 2^-6 m/8 for e = 0; S.1111.111 is NaN.
fn e4m3_reference(code: u8) -> f64 {
    let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
    let (e, m) = (((code >> 3) & 15) as i32, (code & 7) as f64);
    if e == 15 && m == 7.0 {
        return f64::NAN;
    }
    sign * if e == 0 {
        2f64.powi(-6) * m / 8.0
    } else {
        2f64.powi(e - 7) * (1.0 + m / 8.0)
    }
}

#[test]
fn every_e4m3_code_decodes_like_the_reference_decoder() {
    for code in 0..=255u8 {
        let want = e4m3_reference(code);
        let got = quant::e4m3_to_f32(code) as f64;
        assert!(
            got == want || (got.is_nan() && want.is_nan()),
            "{code:#04x}"
        );
    }
    assert_eq!(e4m3_reference(0x7e), 448.0);
    assert_eq!(e4m3_reference(0x01), 2f64.powi(-9));
}

/// A packed cache of `blocks` pages of 16 tokens whose token 0 of page i holds `rows[i]`
/// (512 codes and 4 scales; rope values 0).
fn packed_cache(rows: &[(Vec<u8>, [f32; 4])]) -> Tensor {
    let mut bytes = vec![0u8; rows.len() * 16 * quant::ROW_BYTES];
    for (i, (codes, scales)) in rows.iter().enumerate() {
        let r = &mut bytes[i * 16 * quant::ROW_BYTES..][..quant::ROW_BYTES];
        r[..512].copy_from_slice(codes);
        for (g, s) in scales.iter().enumerate() {
            r[quant::SCALES_AT + 4 * g..][..4].copy_from_slice(&s.to_le_bytes());
        }
    }
    Tensor::u8(&[rows.len(), 16, quant::ROW_BYTES], bytes).unwrap()
}

#[test]
fn the_kernel_decodes_every_8_bit_code_exactly() {
    // One key per sequence: the output is its V row (the multiply variant with P in f32 gives
    // p = 1 and l = 1), so every code's decoded value times its scale comes out as it is.
    let g = gpu();
    let finite: Vec<u8> = (0..=255u8).filter(|c| c & 0x7f != 0x7f).collect();
    let spread = |codes: &[u8]| {
        (0..512)
            .map(|d| codes[d % codes.len()])
            .collect::<Vec<u8>>()
    };
    let all: Vec<u8> = (0..=255u8).collect();
    let scales = [[1.0, 1.0, 1.0, 1.0], [0.5, 3.0, 1e-3, 2f32.powi(-20)]];
    for format in [KvFormat::Fp8, KvFormat::Int8] {
        let codes = if format == KvFormat::Fp8 {
            spread(&finite)
        } else {
            spread(&all)
        };
        let mut rows: Vec<(Vec<u8>, [f32; 4])> =
            scales.iter().map(|&s| (codes.clone(), s)).collect();
        if format == KvFormat::Fp8 {
            // The two NaN codes: their rows come out NaN.
            for nan in [0x7f, 0xff] {
                let mut c = codes.clone();
                c[300] = nan;
                rows.push((c, [1.0; 4]));
            }
        }
        let b = rows.len();
        let kv = packed_cache(&rows);
        let q = Tensor::f32(
            &[b, 1, 1, 576],
            (0..b * 576).map(|i| (i % 7) as f32 - 3.0).collect(),
        )
        .unwrap();
        let table = Tensor::i32(&[b, 1], (0..b as i32).collect()).unwrap();
        let lens = Tensor::i32(&[b], vec![1; b]).unwrap();
        let mut p = params(Rescale::Multiply, PPrecision::F32, Split::Off, false);
        p.kv_format = format;
        let got = amla::amla(g, &q, &kv, &table, &lens, &p)
            .unwrap()
            .out
            .to_f32();
        for (i, (codes, scales)) in rows.iter().enumerate() {
            for d in 0..512 {
                let value = match format {
                    KvFormat::Int8 => codes[d] as i8 as f64,
                    _ => e4m3_reference(codes[d]),
                };
                let want = (value * scales[d / 128] as f64) as f32;
                let got = got[i * 512 + d];
                if i >= 2 {
                    assert!(got.is_nan(), "{format:?} NaN row {i}");
                } else {
                    assert_eq!(
                        got, want,
                        "{format:?} row {i} dim {d} code {:#04x}",
                        codes[d]
                    );
                }
            }
        }
    }
}

#[test]
fn fp8_and_int8_caches_in_every_variant() {
    let g = gpu();
    for format in [KvFormat::Fp8, KvFormat::Int8] {
        let spec = InputSpec::new(&[0, 1, 17, 64, 203], 1, 16, 16, DType::BF16).quantized(format);
        for (rescale, p) in [
            (Rescale::Amla, PPrecision::F32),
            (Rescale::Amla, PPrecision::Cache),
            (Rescale::Multiply, PPrecision::F16),
        ] {
            for split in [Split::Off, Split::Chunk { keys: 48 }] {
                check(
                    g,
                    &format!("{format:?}"),
                    &spec,
                    params(rescale, p, split, false),
                    31,
                );
            }
        }
        let causal = InputSpec::new(&[3, 70, 33], 2, 8, 64, DType::F16).quantized(format);
        check(g, "8-bit causal", &causal, amla16(Split::default()), 32);
    }
}

#[test]
fn flashmla_cache_layout_with_a_head_dim_of_one() {
    // FlashMLA's [num_blocks, page, 1, 576] (and [.., 1, 656] packed) give the same result as
    // the 3-D form; any other head count is refused.
    let g = gpu();
    for format in [KvFormat::Float, KvFormat::Fp8] {
        let mut spec = InputSpec::new(&[20, 45], 1, 4, 16, DType::BF16);
        if format != KvFormat::Float {
            spec = spec.quantized(format);
        }
        let x = AmlaInputs::generate(&spec, 33).unwrap();
        let mut p = amla16(Split::Chunk { keys: 16 });
        p.kv_format = format;
        let [n, page, w] = [
            x.kv_cache.shape()[0],
            x.kv_cache.shape()[1],
            x.kv_cache.shape()[2],
        ];
        let four = x.kv_cache.clone().reshape(&[n, page, 1, w]).unwrap();
        let run = |kv: &Tensor| amla::amla(g, &x.q, kv, &x.block_table, &x.cache_seqlens, &p);
        assert_eq!(run(&four).unwrap(), run(&x.kv_cache).unwrap());
        let exact = reference::exact(&x.q, &four, &x.block_table, &x.cache_seqlens, &p).unwrap();
        let c = compare(
            &run(&four).unwrap().out.to_f32(),
            &exact.out,
            out_tolerance(),
        );
        must_pass("4-d cache", &c, &[2, 1, 4, 512]);
        // The device path takes either form of the planned cache.
        let shape = AmlaShape::of(&x.q, &four, &x.block_table, &x.cache_seqlens).unwrap();
        assert_eq!(shape.kv_shape(), [n, page, w]);
        let plan = AmlaPlan::new(g, &shape, &p).unwrap();
        let schedule = plan.schedule(g, &x.block_table, &x.cache_seqlens).unwrap();
        let (q, kv3) = (g.upload(&x.q).unwrap(), g.upload(&x.kv_cache).unwrap());
        let out = g.zeros(&shape.out_shape(), shape.out_dtype).unwrap();
        let lse = g.zeros(&shape.lse_shape(), DType::F32).unwrap();
        g.run(|rec| plan.record(g, rec, &schedule, &q, &kv3, &out, &lse))
            .unwrap();
        let two_heads = x.kv_cache.clone().reshape(&[n, page / 2, 2, w]).unwrap();
        let err = run(&two_heads).unwrap_err();
        assert!(
            matches!(err, Error::Shape { .. }) && err.to_string().contains("kv_cache"),
            "{err}"
        );
    }
}

#[test]
fn bad_8_bit_caches_are_typed_errors_naming_the_tensor() {
    let g = gpu();
    let spec = InputSpec::new(&[20, 33], 1, 4, 16, DType::BF16).quantized(KvFormat::Fp8);
    let x = AmlaInputs::generate(&spec, 34).unwrap();
    let fp8 = AmlaParams {
        kv_format: KvFormat::Fp8,
        ..AmlaParams::default()
    };
    let run = |x: &AmlaInputs, p: &AmlaParams| {
        amla::amla(g, &x.q, &x.kv_cache, &x.block_table, &x.cache_seqlens, p)
    };
    run(&x, &fp8).unwrap();
    // Packed rows of 655 and 657 bytes, and 576 bytes (a float row's width).
    for width in [655, 657, 576] {
        let bad = AmlaInputs {
            kv_cache: Tensor::zeros(&[9, 16, width], DType::U8).unwrap(),
            ..x.clone()
        };
        let err = run(&bad, &fp8).unwrap_err();
        assert!(
            matches!(err, Error::Shape { .. }) && err.to_string().contains("kv_cache"),
            "{err}"
        );
        assert!(err.to_string().contains("656"), "{err}");
    }
    // The format and the cache dtype must agree.
    let err = run(&x, &AmlaParams::default()).unwrap_err();
    assert!(
        matches!(err, Error::Invalid { .. }) && err.to_string().contains("kv_format"),
        "{err}"
    );
    let float =
        AmlaInputs::generate(&InputSpec::new(&[20, 33], 1, 4, 16, DType::BF16), 34).unwrap();
    let err = run(&float, &fp8).unwrap_err();
    assert!(
        matches!(err, Error::Invalid { .. }) && err.to_string().contains("kv_format"),
        "{err}"
    );
    let ints = AmlaInputs {
        kv_cache: Tensor::zeros(&[9, 16, 576], DType::I32).unwrap(),
        ..x.clone()
    };
    let err = run(&ints, &AmlaParams::default()).unwrap_err();
    assert!(
        matches!(err, Error::Unsupported { .. }) && err.to_string().contains("kv_cache"),
        "{err}"
    );
    // Zero, negative and too large scales in a row a sequence uses are refused, naming the row
    // and the scale; in an unused row they are ignored; NaN and inf propagate instead.
    let used = cache_row(&x, 1, 3);
    let spare = (0..x.kv_cache.shape()[0] * 16)
        .find(|&r| (0..2).all(|s| (0..[20, 33][s]).all(|k| cache_row(&x, s, k) != r)))
        .unwrap();
    let set_scale = |row: usize, v: f32| {
        let mut bytes = x.kv_cache.as_u8().unwrap().to_vec();
        bytes[row * quant::ROW_BYTES + quant::SCALES_AT + 8..][..4]
            .copy_from_slice(&v.to_le_bytes());
        AmlaInputs {
            kv_cache: Tensor::u8(x.kv_cache.shape(), bytes).unwrap(),
            ..x.clone()
        }
    };
    for bad in [0.0f32, -0.0, -1.5, 1e38, f32::MAX] {
        let err = run(&set_scale(used, bad), &fp8).unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, Error::Invalid { .. })
                && text.contains("kv_cache[")
                && text.contains("scale 2"),
            "{bad}: {text}"
        );
        assert!(
            reference::exact(
                &x.q,
                &set_scale(used, bad).kv_cache,
                &x.block_table,
                &x.cache_seqlens,
                &fp8
            )
            .is_err()
        );
        run(&set_scale(spare, bad), &fp8).unwrap();
    }
    let nan = run(&set_scale(used, f32::NAN), &fp8).unwrap();
    assert!(nan.lse.to_f32()[4..8].iter().all(|v| v.is_nan()));
    // Nothing is dispatched for a wrong device tensor either.
    let shape = AmlaShape::of(&x.q, &x.kv_cache, &x.block_table, &x.cache_seqlens).unwrap();
    let plan = AmlaPlan::new(g, &shape, &fp8).unwrap();
    let schedule = plan.schedule(g, &x.block_table, &x.cache_seqlens).unwrap();
    let q = g.upload(&x.q).unwrap();
    let bf16_kv = g.upload(&float.kv_cache).unwrap();
    let out = g.zeros(&shape.out_shape(), shape.out_dtype).unwrap();
    let lse = g.zeros(&shape.lse_shape(), DType::F32).unwrap();
    let mut encoder = g.device.create_command_encoder(&Default::default());
    let mut rec = Recorder::new(&mut encoder);
    assert!(
        plan.record(g, &mut rec, &schedule, &q, &bf16_kv, &out, &lse)
            .is_err()
    );
    assert!(rec.pass_labels().is_empty());
}

#[test]
fn quantize_cache_stays_close_to_the_float_cache_it_came_from() {
    // The quantizer's own error, end to end: attention on the FP8 / int8 cache against the exact
    // reference on the float cache it came from. With δ² = Σ(v̂ - v)² / Σ v² over the values the
    // sequences use, an output (an average of v) has a relative error of about δ, a cosine
    // difference of about δ²/2; the keys' errors move the scores and so P by about as much
    // again: the bound is 4 δ², twice that.
    let g = gpu();
    let spec = InputSpec::new(&[40, 100], 1, 16, 16, DType::F32);
    let x = AmlaInputs::generate(&spec, 35).unwrap();
    let p = AmlaParams::default();
    let exact = reference::exact(&x.q, &x.kv_cache, &x.block_table, &x.cache_seqlens, &p).unwrap();
    let source = x.kv_cache.to_f64();
    for format in [KvFormat::Fp8, KvFormat::Int8] {
        let kv = amla::quantize_cache(&x.kv_cache, format).unwrap();
        let bytes = kv.as_u8().unwrap();
        let (mut err, mut norm) = (0.0, 0.0);
        for (seq, &len) in [40usize, 100].iter().enumerate() {
            for k in 0..len {
                let row = cache_row(&x, seq, k);
                let decoded =
                    quant::decode_row(&bytes[row * quant::ROW_BYTES..][..quant::ROW_BYTES], format);
                for (d, v) in decoded.iter().enumerate() {
                    let s = source[row * 576 + d];
                    err += (v - s) * (v - s);
                    norm += s * s;
                }
            }
        }
        let bound = 4.0 * err / norm;
        let fp = AmlaParams {
            kv_format: format,
            ..p
        };
        let got = amla::amla(g, &x.q, &kv, &x.block_table, &x.cache_seqlens, &fp).unwrap();
        let tol = fusedops::check::Tolerance::new(1.0, 0.0).with_cos_diff(bound);
        let c = compare(&got.out.to_f32(), &exact.out, tol);
        must_pass(
            &format!("{format:?} vs its float source"),
            &c,
            &[2, 1, 16, 512],
        );
    }
}

// ---- parameters and hand-built shapes that cannot be represented ----

#[test]
fn softmax_scales_the_prologue_cannot_represent_are_refused() {
    let g = gpu();
    let x = good();
    for scale in [3e38f32, -3e38, f32::INFINITY, f32::NAN, 2.4e38] {
        let p = AmlaParams {
            softmax_scale: Some(scale),
            ..AmlaParams::default()
        };
        let err =
            amla::amla(g, &x.q, &x.kv_cache, &x.block_table, &x.cache_seqlens, &p).unwrap_err();
        assert!(
            matches!(err, Error::Invalid { .. }) && err.to_string().contains("softmax_scale"),
            "{scale}: {err}"
        );
    }
    // Representable as a factor, but q times it overflows f32.
    let p = AmlaParams {
        softmax_scale: Some(1e38),
        ..AmlaParams::default()
    };
    let err = amla::amla(g, &x.q, &x.kv_cache, &x.block_table, &x.cache_seqlens, &p).unwrap_err();
    assert!(err.to_string().contains("softmax_scale"), "{err}");
    // Large and small scales that fit are computed right.
    let spec = InputSpec::new(&[20, 33], 1, 4, 16, DType::F32);
    for scale in [40.0f32, 1e-30, 0.0, -0.1] {
        let p = AmlaParams {
            softmax_scale: Some(scale),
            ..AmlaParams::default()
        };
        check(g, &format!("scale {scale}"), &spec, p, 36);
    }
}

#[test]
fn hand_built_shapes_whose_sizes_wrap_get_no_plan() {
    let g = gpu();
    let x = good();
    let shape = AmlaShape::of(&x.q, &x.kv_cache, &x.block_table, &x.cache_seqlens).unwrap();
    let p = AmlaParams::default();
    let huge = [
        AmlaShape {
            num_blocks: 1 << 60,
            ..shape
        },
        AmlaShape {
            batch: 1 << 62,
            ..shape
        },
        AmlaShape {
            s_q: 1 << 40,
            h_q: 1 << 40,
            ..shape
        },
        AmlaShape {
            max_blocks: 1 << 40,
            ..shape
        },
        AmlaShape {
            page_size: 1 << 40,
            ..shape
        },
        AmlaShape {
            batch: usize::MAX,
            max_blocks: usize::MAX,
            ..shape
        },
        AmlaShape {
            num_blocks: 1 << 24,
            ..shape
        }, // 2^24 x 16 x 1152 bytes: past 32-bit indexing
    ];
    for s in huge {
        let err = AmlaPlan::new(g, &s, &p).unwrap_err();
        assert!(matches!(err, Error::Invalid { .. }), "{s:?}: {err}");
        let tiles = TileConfig::new(4, 16, s.kv_dtype).unwrap();
        assert!(AmlaPlan::with_tiles(g, &s, &p, tiles).is_err());
        assert!(s.validate_indices(&[0; 4], &[1, 1]).is_err());
    }
}
