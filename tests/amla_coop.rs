//! AMLA's cooperative-matrix decode (shaders/amla_decode_coop.wgsl) against the exact f64
//! reference and against the emulation of its own steps, on NaN-padded paged caches with shuffled
//! block tables. On the cooperative-matrix CI lane (FUSEDOPS_EXPECT_COOP=1, lavapipe 8x8) every
//! case asserts that the coop path was chosen; on an adapter without cooperative matrices the
//! same cases run the SIMT fallback (against the same references) and explicit coop plans are
//! refused with typed errors.

mod common;

use common::{coop_fragment, expect_coop, gpu, gpu_without};
use fusedops::check::{Comparison, compare};
use fusedops::error::Error;
use fusedops::gpu::{Feature, Gpu};
use fusedops::ops::amla::cases::{exact_out_tolerance, lse_tolerance, round_to};
use fusedops::ops::amla::coop::{self, CoopEmulation};
use fusedops::ops::amla::inputs::{AmlaInputs, InputSpec, Pattern};
use fusedops::ops::amla::reference::{self, AmlaStats};
use fusedops::ops::amla::{
    self, AmlaParams, AmlaPlan, AmlaShape, CoopConfig, KvFormat, PPrecision, Rescale, Split, quant,
};
use fusedops::registry::Operator;
use fusedops::tensor::{DType, Tensor};

const RESCALES: [Rescale; 2] = [Rescale::Amla, Rescale::Multiply];

fn params(rescale: Rescale, split: Split, causal: bool) -> AmlaParams {
    AmlaParams {
        softmax_scale: None,
        causal,
        rescale,
        p_precision: PPrecision::F16,
        split,
        kv_format: KvFormat::Float,
    }
}

/// `p` with P rounded to bf16 (held as f16 by the coop kernel).
fn bf16_p(p: AmlaParams) -> AmlaParams {
    AmlaParams {
        p_precision: PPrecision::BF16,
        ..p
    }
}

fn must_pass(what: &str, c: &Comparison, shape: &[usize]) {
    assert!(c.pass, "{what}: {}", c.summary(shape));
}

/// What one checked run produced.
struct Run {
    got: amla::AmlaOutput,
    /// The coop emulation when the coop path ran.
    coop: Option<CoopEmulation>,
    stats: AmlaStats,
}

/// Plan (`config`, or what `AmlaPlan::new` chooses), run with `out_dtype`, and check against the
/// exact reference and the emulation of the kernel that ran. On the coop lane the coop path must
/// have been chosen.
fn run_checked(
    g: &Gpu,
    label: &str,
    x: &AmlaInputs,
    p: AmlaParams,
    out_dtype: DType,
    config: Option<CoopConfig>,
) -> Run {
    let mut shape = AmlaShape::of(&x.q, &x.kv_cache, &x.block_table, &x.cache_seqlens).unwrap();
    shape.out_dtype = out_dtype;
    let plan = match config {
        Some(c) => AmlaPlan::with_coop(g, &shape, &p, c).unwrap(),
        None => AmlaPlan::new(g, &shape, &p).unwrap(),
    };
    if expect_coop() {
        assert!(
            plan.coop().is_some(),
            "{label}: the coop path was not chosen"
        );
    }
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
    let label = format!("{label} [{}]", plan.variant());
    let (o, l) = (got.out.to_f32(), got.lse.to_f32());
    let (os, ls) = (shape.out_shape(), shape.lse_shape());
    let exact = reference::exact(&x.q, &x.kv_cache, &x.block_table, &x.cache_seqlens, &p).unwrap();
    let max_abs_v = reference::max_abs_v(&x.kv_cache, p.kv_format);
    let mut exact_tol = (
        exact_out_tolerance(p.rescale, plan.p_rounding(), max_abs_v),
        lse_tolerance(),
    );
    if plan.coop().is_some() {
        let bound = coop::StagingBound::of(&x.q, &x.kv_cache, &p);
        exact_tol = coop::exact_tolerances(exact_tol.0, exact_tol.1, &p, max_abs_v, &bound);
    }
    must_pass(
        &format!("{label} out/exact"),
        &compare(&o, &exact.out, exact_tol.0),
        &os,
    );
    must_pass(
        &format!("{label} lse/exact"),
        &compare(&l, &exact.lse, exact_tol.1),
        &ls,
    );
    let coop = plan.coop().map(|c| {
        coop::emulate(&x.q, &x.kv_cache, &x.block_table, &x.cache_seqlens, &p, c).unwrap()
    });
    let emu = match &coop {
        Some(c) => c.emulation.clone(),
        None => reference::emulate(
            &x.q,
            &x.kv_cache,
            &x.block_table,
            &x.cache_seqlens,
            &p,
            plan.tiles(),
        )
        .unwrap(),
    };
    must_pass(
        &format!("{label} out/emulation"),
        &compare(
            &o,
            &round_to(out_dtype, &emu.out),
            emu.out_tolerance(out_dtype),
        ),
        &os,
    );
    must_pass(
        &format!("{label} lse/emulation"),
        &compare(&l, &emu.lse, emu.lse_tolerance()),
        &ls,
    );
    Run {
        got,
        stats: emu.stats,
        coop,
    }
}

fn check(g: &Gpu, label: &str, spec: &InputSpec, p: AmlaParams, seed: u64) -> Run {
    let x = AmlaInputs::generate(spec, seed).unwrap();
    run_checked(g, label, &x, p, DType::F32, None)
}

/// An explicit coop configuration for the default adapter; `None` where it has no coop
/// fragment (then every explicit coop plan must be refused).
fn config(head_block: u32, tile_keys: u32, lazy: u32) -> Option<CoopConfig> {
    let fragment = coop_fragment()?;
    let sg = gpu().caps.fixed_subgroup_size()?;
    Some(CoopConfig::new(fragment, sg, head_block, tile_keys, lazy).unwrap())
}

/// `x` with cache value `dim` of key `key` of sequence `seq` set to `value` (through the block
/// table, so the key's page is found as the kernel finds it).
fn set_key(x: &AmlaInputs, seq: usize, key: usize, dim: usize, value: f32) -> AmlaInputs {
    let page = x.kv_cache.shape()[1];
    let width = x.block_table.shape()[1];
    let block = x.block_table.as_i32().unwrap()[seq * width + key / page] as usize;
    let mut cache = x.kv_cache.to_f32();
    cache[(block * page + key % page) * 576 + dim] = value;
    AmlaInputs {
        kv_cache: Tensor::from_f32(x.kv_cache.shape(), &cache, x.kv_cache.dtype()).unwrap(),
        ..x.clone()
    }
}

/// `x` with q value `dim` of every row set to `value`.
fn set_q(x: &AmlaInputs, dim: usize, value: f32) -> AmlaInputs {
    let mut q = x.q.to_f32();
    for row in q.chunks_mut(576) {
        row[dim] = value;
    }
    AmlaInputs {
        q: Tensor::from_f32(x.q.shape(), &q, x.q.dtype()).unwrap(),
        ..x.clone()
    }
}

#[test]
fn the_path_is_chosen_from_the_adapter_and_reported() {
    let g = gpu();
    let fragment = coop_fragment();
    let x = AmlaInputs::generate(&InputSpec::new(&[20, 33], 1, 16, 16, DType::BF16), 1).unwrap();
    let shape = AmlaShape::of(&x.q, &x.kv_cache, &x.block_table, &x.cache_seqlens).unwrap();
    let p16 = params(Rescale::Amla, Split::Off, false);
    let plan = AmlaPlan::new(g, &shape, &p16).unwrap();
    let op = &amla::OPERATOR;
    let coop_line = |gpu: &Gpu| {
        op.paths(gpu)
            .into_iter()
            .find(|(what, _)| what == "decode (16-bit q and P)")
            .expect("the coop decode line")
            .1
    };
    match fragment {
        Some(f) => {
            let c = plan.coop().expect("coop plan on a coop adapter");
            assert_eq!(c.fragment, f);
            assert!(plan.variant().contains(&format!("coop{}", f.name())));
            assert!(
                coop_line(g).contains(&format!("cooperative matrices {}", f.name())),
                "{}",
                coop_line(g)
            );
            // P in f32, f32 q or an f32 cache keep the SIMT kernel, with the reason.
            let p32 = AmlaParams {
                p_precision: PPrecision::F32,
                ..p16
            };
            for (s, p) in [
                (shape, p32),
                (
                    AmlaShape {
                        q_dtype: DType::F32,
                        ..shape
                    },
                    p16,
                ),
                (
                    AmlaShape {
                        kv_dtype: DType::F32,
                        ..shape
                    },
                    p16,
                ),
            ] {
                assert!(CoopConfig::choose(g, &s, &p).is_err());
            }
            assert!(AmlaPlan::new(g, &shape, &p32).unwrap().coop().is_none());
        }
        None => {
            assert!(plan.coop().is_none());
            assert!(coop_line(g).starts_with("f32 SIMT ("), "{}", coop_line(g));
        }
    }
    // FUSEDOPS_DISABLE=coop gives the SIMT kernel, and says so.
    let simt = gpu_without(&[Feature::CooperativeMatrix]);
    assert!(AmlaPlan::new(&simt, &shape, &p16).unwrap().coop().is_none());
    assert!(coop_line(&simt).contains("FUSEDOPS_DISABLE=coop"));
    // The registry's CI cases say whether they run on tensor cores (the bench's compute roof
    // and its coop-off twin rows depend on it).
    let cases = op.cases(fusedops::registry::Scale::Ci, g);
    assert_eq!(
        cases.iter().any(|c| c.uses_tensor_cores(g)),
        fragment.is_some()
    );
    assert!(!cases.iter().any(|c| c.uses_tensor_cores(&simt)));
}

#[test]
fn head_counts_1_16_64_128() {
    let g = gpu();
    for (h, seqlens) in [
        (1, vec![7, 100]),
        (16, vec![90]),
        (64, vec![40, 2]),
        (128, vec![37, 9]),
    ] {
        let spec = InputSpec::new(&seqlens, 1, h, 64, DType::BF16);
        let split = Split::Auto {
            target_workgroups: 8,
        };
        for rescale in RESCALES {
            check(
                g,
                &format!("h={h}"),
                &spec,
                params(rescale, split, false),
                h as u64,
            );
        }
    }
}

#[test]
fn causal_query_tokens_1_2_4() {
    let g = gpu();
    for s_q in [1, 2, 4] {
        // Lengths 1 and 3 are shorter than s_q = 4: those rows see few or no keys. 5 heads:
        // rows are not a multiple of the fragment.
        let spec = InputSpec::new(&[1, 3, 70, 33], s_q, 5, 32, DType::BF16);
        for rescale in RESCALES {
            let r = check(
                g,
                &format!("s_q={s_q} causal"),
                &spec,
                params(rescale, Split::Chunk { keys: 32 }, true),
                s_q as u64,
            );
            let lse = r.got.lse.to_f32();
            for h in 0..5 {
                for t in 0..s_q {
                    let v = lse[h * s_q + t];
                    assert_eq!(v == f32::NEG_INFINITY, t + 1 < s_q, "s_q={s_q} h={h} t={t}");
                }
            }
        }
    }
}

#[test]
fn rising_max_hits_the_minus_30_clamp() {
    let g = gpu();
    // Scores rise 2.5 binades per key (20 to 80 binades per tile), then 10 per key (160+ per
    // tile): every tile moves every row's reference, far past the lazy threshold.
    for ramp in [2.5, 10.0] {
        let mut spec = InputSpec::new(&[300, 130], 1, 16, 64, DType::BF16);
        spec.pattern = Pattern {
            ramp_log2_per_key: ramp,
            column: None,
        };
        for rescale in RESCALES {
            for split in [Split::Off, Split::Chunk { keys: 96 }] {
                let label = format!("rising max {ramp}");
                let r = check(g, &label, &spec, params(rescale, split, false), 11);
                let Some(emu) = r.coop else { continue };
                // A round trip in nearly every tile but each range's first (and a last tile of
                // a few keys, which may rise less than the threshold).
                assert!(
                    emu.round_trips * 10 >= emu.fragment_tiles * 7,
                    "{label}: {} round trips in {} fragment tiles",
                    emu.round_trips,
                    emu.fragment_tiles
                );
                if rescale == Rescale::Amla {
                    let s = r.stats;
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
fn a_max_that_rises_once_makes_one_round_trip() {
    let g = gpu();
    // Random scores (a few binades), then key 77 of each sequence scores about 20 binades more
    // (through dim 575, where every q row holds 1): one move of every row's reference, so one
    // round trip per row fragment, in the tile of key 77.
    let spec = InputSpec::new(&[150, 100], 1, 16, 64, DType::BF16);
    let mut x = set_q(&AmlaInputs::generate(&spec, 3).unwrap(), 575, 1.0);
    for seq in 0..2 {
        x = set_key(&x, seq, 77, 575, 333.0);
    }
    for rescale in RESCALES {
        let r = run_checked(
            g,
            "rises once",
            &x,
            params(rescale, Split::Off, false),
            DType::F32,
            None,
        );
        if let Some(emu) = r.coop {
            let frags = 2 * 16 / coop_fragment().unwrap().size() as u64;
            assert_eq!(emu.round_trips, frags, "{rescale:?}");
        }
    }
}

#[test]
fn lazy_threshold_zero_rescales_at_every_rise() {
    let g = gpu();
    // The max creeps up (0.05 binades per key) in every tile; V column 7 is exactly 0 in the
    // first 40 keys (AMLA's add must leave exact zeros alone while the exponent steps). With the
    // default threshold the reference hardly moves; with 0 it moves in every tile, as the SIMT
    // kernel's running max.
    let mut spec = InputSpec::new(&[250, 170], 1, 16, 64, DType::BF16);
    spec.pattern = Pattern {
        ramp_log2_per_key: 0.05,
        column: Some(fusedops::ops::amla::inputs::ColumnFill {
            column: 7,
            value: 0.0,
            keys: 40,
        }),
    };
    let x = AmlaInputs::generate(&spec, 5).unwrap();
    let (Some(lazy), Some(eager)) = (config(16, 16, 8), config(16, 16, 0)) else {
        return; // no coop fragment: the refusals are tested below
    };
    for rescale in RESCALES {
        let p = params(rescale, Split::Off, false);
        let few = run_checked(g, "lazy 8", &x, p, DType::F32, Some(lazy))
            .coop
            .unwrap();
        let all = run_checked(g, "lazy 0", &x, p, DType::F32, Some(eager))
            .coop
            .unwrap();
        assert!(
            few.round_trips * 4 < all.round_trips,
            "{} vs {}",
            few.round_trips,
            all.round_trips
        );
        assert!(all.round_trips * 10 >= all.fragment_tiles * 8);
    }
}

#[test]
fn bf16_beyond_the_f16_range_saturates() {
    let g = gpu();
    // V values of 1e6 and -2e5 and a key value of 7e4 (its q dim holds 1e-3, so the score moves
    // by about 4 binades): the coop path stages them as +-65504 (never inf) and matches the exact
    // reference of the saturated cache; the SIMT path computes with them as they are.
    let spec = InputSpec::new(&[40, 70], 1, 16, 16, DType::BF16);
    let x = set_q(&AmlaInputs::generate(&spec, 8).unwrap(), 570, 1e-3);
    let x = set_key(&set_key(&x, 0, 3, 10, 1e6), 0, 3, 11, -2e5);
    let x = set_key(&x, 1, 50, 570, 7e4);
    let p = params(Rescale::Amla, Split::Off, false);
    let saturated = AmlaInputs {
        kv_cache: Tensor::from_f32(
            x.kv_cache.shape(),
            &x.kv_cache
                .to_f32()
                .iter()
                .map(|&v| {
                    if v.is_nan() {
                        v
                    } else {
                        coop::to_f16_saturating(v)
                    }
                })
                .collect::<Vec<_>>(),
            // f32: bf16 cannot hold 65504 (it rounds to 65536).
            DType::F32,
        )
        .unwrap(),
        ..x.clone()
    };
    let exact = |x: &AmlaInputs| {
        reference::exact(&x.q, &x.kv_cache, &x.block_table, &x.cache_seqlens, &p).unwrap()
    };
    let shape = AmlaShape::of(&x.q, &x.kv_cache, &x.block_table, &x.cache_seqlens).unwrap();
    let (os, ls) = (shape.out_shape(), shape.lse_shape());
    // P in f16: its rounding moves an output by up to 2^-11 of the largest |v| (and AMLA's
    // compensation as much again), here of 65504 or 1e6.
    let out_tol = |x: &AmlaInputs| {
        exact_out_tolerance(
            p.rescale,
            PPrecision::F16,
            reference::max_abs_v(&x.kv_cache, KvFormat::Float),
        )
    };
    let run =
        |g: &Gpu| amla::amla(g, &x.q, &x.kv_cache, &x.block_table, &x.cache_seqlens, &p).unwrap();
    if coop_fragment().is_some() {
        let got = run(g);
        let (o, l) = (got.out.to_f32(), got.lse.to_f32());
        assert!(o.iter().chain(&l).all(|v| v.is_finite()));
        let want = exact(&saturated);
        must_pass(
            "saturated out",
            &compare(&o, &want.out, out_tol(&saturated)),
            &os,
        );
        must_pass(
            "saturated lse",
            &compare(&l, &want.lse, lse_tolerance()),
            &ls,
        );
        // ... which is not the exact reference of the values as given.
        assert!(!compare(&l, &exact(&x).lse, lse_tolerance()).pass);
    }
    let simt = gpu_without(&[Feature::CooperativeMatrix]);
    let got = run(&simt);
    let want = exact(&x);
    must_pass(
        "simt out",
        &compare(&got.out.to_f32(), &want.out, out_tol(&x)),
        &os,
    );
    must_pass(
        "simt lse",
        &compare(&got.lse.to_f32(), &want.lse, lse_tolerance()),
        &ls,
    );
}

#[test]
fn every_configuration_that_fits() {
    let g = gpu();
    // 15 query rows (5 heads x 3 causal tokens): not a multiple of any fragment or head block;
    // 45 and 100 keys: not multiples of any tile.
    let spec = InputSpec::new(&[45, 100], 3, 5, 16, DType::F16);
    let x = AmlaInputs::generate(&spec, 15).unwrap();
    let shape = AmlaShape::of(&x.q, &x.kv_cache, &x.block_table, &x.cache_seqlens).unwrap();
    let Some(fragment) = coop_fragment() else {
        return;
    };
    let sg = g.caps.fixed_subgroup_size().unwrap();
    let mut ran = 0;
    for hb in [8, 16, 32, 64] {
        for tn in [8, 16, 32] {
            let Ok(c) = CoopConfig::new(fragment, sg, hb, tn, 8) else {
                continue;
            };
            if c.workgroup_bytes > g.caps.max_workgroup_storage
                || c.workgroup_size() > g.caps.max_invocations_per_workgroup
            {
                let p = params(Rescale::Amla, Split::Off, true);
                let err = AmlaPlan::with_coop(g, &shape, &p, c).unwrap_err();
                assert!(matches!(err, Error::Limit { .. }), "{c:?}: {err}");
                continue;
            }
            // The rescale variants take turns (lavapipe is slow).
            let p = params(RESCALES[ran % 2], Split::Chunk { keys: 24 }, true);
            run_checked(g, &format!("hb={hb} tn={tn}"), &x, p, DType::F16, Some(c));
            ran += 1;
        }
    }
    assert!(ran >= 4, "only {ran} configurations ran");
}

#[test]
fn page_sizes_and_spare_pages() {
    let g = gpu();
    for page in [16, 64, 256] {
        let mut spec = InputSpec::new(&[page + 3, 2 * page - 1, 5], 1, 4, page, DType::BF16);
        spec.spare_blocks = 3;
        spec.spare_columns = 2;
        check(
            g,
            &format!("page {page}"),
            &spec,
            params(Rescale::Amla, Split::Chunk { keys: 64 }, false),
            page as u64,
        );
    }
}

#[test]
fn sixteen_bit_q_cache_and_out() {
    let g = gpu();
    for dtype in [DType::BF16, DType::F16] {
        let spec = InputSpec::new(&[33, 0, 100], 2, 8, 64, dtype);
        let x = AmlaInputs::generate(&spec, 3).unwrap();
        for rescale in RESCALES {
            run_checked(
                g,
                "16-bit out",
                &x,
                params(rescale, Split::default(), true),
                dtype,
                None,
            );
        }
    }
}

#[test]
fn explicit_coop_plans_are_validated() {
    let g = gpu();
    let x = AmlaInputs::generate(&InputSpec::new(&[20, 33], 1, 16, 16, DType::BF16), 19).unwrap();
    let shape = AmlaShape::of(&x.q, &x.kv_cache, &x.block_table, &x.cache_seqlens).unwrap();
    let p = params(Rescale::Amla, Split::Off, false);
    let some = CoopConfig::new(fusedops::gpu::Fragment::Size8, 8, 16, 16, 8).unwrap();
    // No cooperative matrices: refused, whatever the configuration.
    let simt = gpu_without(&[Feature::CooperativeMatrix]);
    let err = AmlaPlan::with_coop(&simt, &shape, &p, some).unwrap_err();
    assert!(matches!(err, Error::Unsupported { .. }), "{err}");
    let Some(c) = config(16, 16, 8) else {
        let err = AmlaPlan::with_coop(g, &shape, &p, some).unwrap_err();
        assert!(matches!(err, Error::Unsupported { .. }), "{err}");
        return;
    };
    AmlaPlan::with_coop(g, &shape, &p, c).unwrap();
    // Inputs the coop decode does not take.
    let p32 = AmlaParams {
        p_precision: PPrecision::F32,
        ..p
    };
    let f32_q = AmlaShape {
        q_dtype: DType::F32,
        ..shape
    };
    let f32_cache = AmlaShape {
        kv_dtype: DType::F32,
        ..shape
    };
    for (s, p) in [(shape, p32), (f32_q, p), (f32_cache, p)] {
        let err = AmlaPlan::with_coop(g, &s, &p, c).unwrap_err();
        assert!(matches!(err, Error::Unsupported { .. }), "{err}");
    }
    // Forged configurations, another subgroup size, a bad shape.
    for forged in [
        CoopConfig { k_split: 3, ..c },
        CoopConfig {
            head_block: 128,
            ..c
        },
        CoopConfig {
            workgroup_bytes: 64,
            ..c
        },
    ] {
        let err = AmlaPlan::with_coop(g, &shape, &p, forged).unwrap_err();
        assert!(matches!(err, Error::Invalid { .. }), "{forged:?}: {err}");
    }
    let other_sg = CoopConfig::new(c.fragment, 2 * c.subgroup_size, 16, 16, 8).unwrap();
    let err = AmlaPlan::with_coop(g, &shape, &p, other_sg).unwrap_err();
    assert!(matches!(err, Error::Unsupported { .. }), "{err}");
    let err = AmlaPlan::with_coop(
        g,
        &AmlaShape {
            page_size: 48,
            ..shape
        },
        &p,
        c,
    )
    .unwrap_err();
    assert!(matches!(err, Error::Invalid { .. }), "{err}");
    // A schedule of a coop plan is refused by another plan, like any.
    let plan = AmlaPlan::with_coop(g, &shape, &p, c).unwrap();
    let schedule = plan.schedule(g, &x.block_table, &x.cache_seqlens).unwrap();
    let other = AmlaPlan::new(g, &shape, &p).unwrap();
    let (q, kv) = (g.upload(&x.q).unwrap(), g.upload(&x.kv_cache).unwrap());
    let out = g.zeros(&shape.out_shape(), shape.out_dtype).unwrap();
    let lse = g.zeros(&shape.lse_shape(), DType::F32).unwrap();
    assert!(matches!(
        other.bind(g, &schedule, &q, &kv, &out, &lse),
        Err(Error::Invalid { .. })
    ));
}

#[test]
fn variants_split_and_unsplit_on_nan_padded_caches() {
    let g = gpu();
    coop_fragment();
    // Lengths 0 and 1, around and not at multiples of the page and of the key tile.
    let spec = InputSpec::new(&[0, 1, 15, 16, 17, 64, 129, 203], 1, 16, 16, DType::BF16);
    for (i, rescale) in RESCALES.into_iter().enumerate() {
        for split in [Split::Off, Split::Chunk { keys: 48 }] {
            check(g, "bf16", &spec, params(rescale, split, false), i as u64);
        }
        // P rounded to bf16 (CANN's choice for a bf16 cache), held as f16 by the fragments.
        check(
            g,
            "bf16 P",
            &spec,
            bf16_p(params(rescale, Split::Off, false)),
            3,
        );
    }
    let spec = InputSpec::new(&[70, 5, 33], 1, 16, 64, DType::F16);
    for rescale in RESCALES {
        check(g, "f16", &spec, params(rescale, Split::default(), false), 7);
    }
}

#[test]
fn nan_and_inf_reach_exactly_the_rows_that_see_them() {
    let g = gpu();
    // s_q = 2 causal, 4 heads: row = token * 4 + head. NaN in q of sequence 0, row 1; +inf in a V
    // value of key 36 of sequence 1 (its last key: only token 1 sees it); -inf in a rope value of
    // key 10 of sequence 2 (every row sees it); every slot past a length and every unused page
    // is NaN and must not leak.
    let spec = InputSpec::new(&[40, 37, 50, 0], 2, 4, 16, DType::BF16);
    let mut x = AmlaInputs::generate(&spec, 40).unwrap();
    let mut q = x.q.to_f32();
    q[576 + 100] = f32::NAN;
    x.q = Tensor::from_f32(x.q.shape(), &q, x.q.dtype()).unwrap();
    let x = set_key(
        &set_key(&x, 1, 36, 5, f32::INFINITY),
        2,
        10,
        530,
        f32::NEG_INFINITY,
    );
    let nan_rows = |seq: usize| match seq {
        0 => vec![1],
        1 => vec![4, 5, 6, 7],
        2 => (0..8).collect(),
        _ => vec![],
    };
    let mut variants: Vec<AmlaParams> = Vec::new();
    for rescale in RESCALES {
        for split in [Split::Off, Split::Chunk { keys: 16 }] {
            variants.push(params(rescale, split, true));
        }
    }
    variants.push(bf16_p(params(
        Rescale::Amla,
        Split::Chunk { keys: 16 },
        true,
    )));
    for p in variants {
        let label = format!("poisoned {:?} {:?} {:?}", p.rescale, p.p_precision, p.split);
        let r = run_checked(g, &label, &x, p, DType::F32, None);
        let (out, lse) = (r.got.out.to_f32(), r.got.lse.to_f32());
        for seq in 0..4 {
            for row in 0..8 {
                let o = &out[(seq * 8 + row) * 512..][..512];
                let l = lse[(seq * 4 + row % 4) * 2 + row / 4];
                if nan_rows(seq).contains(&row) {
                    assert!(
                        o.iter().all(|v| v.is_nan()) && l.is_nan(),
                        "{label} {seq} {row}"
                    );
                } else if seq == 3 {
                    assert!(o.iter().all(|&v| v == 0.0) && l == f32::NEG_INFINITY);
                } else {
                    assert!(o.iter().all(|v| v.is_finite()) && l.is_finite(), "{label}");
                }
            }
        }
    }
}

#[test]
fn eight_bit_caches_are_decoded_to_f16_while_staged() {
    let g = gpu();
    // FlashMLA's FP8 layout and its int8 twin (656 bytes per token), decoded (codes times
    // scales) and rounded to f16 in the tile. A NaN code (FP8) or an infinite scale (int8) in key
    // 20 of sequence 0 poisons the rows that see it; the padding is NaN and never read.
    for format in [KvFormat::Fp8, KvFormat::Int8] {
        let spec = InputSpec::new(&[45, 0, 70], 1, 16, 16, DType::BF16).quantized(format);
        let mut x = AmlaInputs::generate(&spec, 22).unwrap();
        let page = x.kv_cache.shape()[1];
        let row = x.block_table.as_i32().unwrap()[20 / page] as usize * page + 20 % page;
        let mut bytes = x.kv_cache.as_u8().unwrap().to_vec();
        let r = &mut bytes[row * quant::ROW_BYTES..(row + 1) * quant::ROW_BYTES];
        match format {
            KvFormat::Fp8 => r[9] = 0x7f,
            _ => r[quant::SCALES_AT..quant::SCALES_AT + 4]
                .copy_from_slice(&f32::INFINITY.to_le_bytes()),
        }
        x.kv_cache = Tensor::u8(x.kv_cache.shape(), bytes).unwrap();
        for rescale in RESCALES {
            for split in [Split::Off, Split::Chunk { keys: 32 }] {
                let p = AmlaParams {
                    kv_format: format,
                    ..params(rescale, split, false)
                };
                let label = format!("{format:?} {rescale:?} {split:?}");
                let r = run_checked(g, &label, &x, p, DType::F32, None);
                let out = r.got.out.to_f32();
                assert!(out[..16 * 512].iter().all(|v| v.is_nan()), "{label}");
                assert!(out[2 * 16 * 512..].iter().all(|v| v.is_finite()), "{label}");
            }
        }
        // P rounded to the cache's 16-bit type (bf16 for an 8-bit cache, as CANN).
        let p = AmlaParams {
            kv_format: format,
            p_precision: PPrecision::Cache,
            ..params(Rescale::Amla, Split::Off, false)
        };
        run_checked(g, "cache-typed P", &x, p, DType::BF16, None);
    }
}
