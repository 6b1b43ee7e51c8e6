//! MerRouter on the default adapter (lavapipe in CI), checked against the CPU reference: routing
//! ids exact on tie-free inputs, dedicated tie and NaN tests, weights within SPEC tolerance, the
//! dispatch layout exact (its order is fully specified) and as per-expert sets, the combine, the
//! unfused baseline chain, the fallback without subgroups, and every error path.

mod common;

use std::collections::BTreeSet;

use common::{gpu, gpu_without, rng};
use fusedops::check::compare;
use fusedops::error::Error;
use fusedops::gpu::{Feature, Gpu, Recorder};
use fusedops::ops::merrouter::{
    self, Combiner, DeviceInputs, Dispatcher, GroupScore, HostInputs, HostLayout,
    IMBALANCE_TOLERANCE, MIN_MARGIN, OPERATOR, Router, RouterConfig, RouterOutput, Scores, Scoring,
    Selection, WEIGHT_TOLERANCE, combine_tolerance, reference,
};
use fusedops::registry::{NamedTensors, Operator, Scale};
use fusedops::tensor::{DType, Tensor};
use rand::Rng;

fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

fn config(
    experts: usize,
    groups: usize,
    top_k: usize,
    scoring: Scoring,
    selection: Selection,
) -> RouterConfig {
    RouterConfig {
        experts,
        groups,
        top_k,
        scoring,
        selection,
        renormalize: false,
        routed_scaling_factor: 1.0,
        block_size: 1,
    }
}

fn limited(k_group: usize, group_score: GroupScore) -> Selection {
    Selection::GroupLimited {
        k_group,
        group_score,
    }
}

/// `[t, e]` logits drawn uniform in [-3, 3) and rounded to `dtype`; `inject(token, row)` may
/// then plant NaN or infinities. A row is redrawn until every decision clears the reference by
/// MIN_MARGIN under each of `biases`, so the kernel must reproduce the reference ids exactly.
fn draw_logits(
    config: &RouterConfig,
    t: usize,
    biases: &[Option<&[f32]>],
    dtype: DType,
    rng: &mut impl Rng,
    inject: impl Fn(usize, &mut [f32]),
) -> Vec<f32> {
    let e = config.experts;
    let biases: Vec<Option<Vec<f64>>> = biases.iter().map(|b| b.map(to64)).collect();
    let mut logits = Vec::with_capacity(t * e);
    for token in 0..t {
        let mut attempts = 0;
        loop {
            attempts += 1;
            assert!(
                attempts < 1000,
                "no tie-free row for token {token} of {config:?}"
            );
            let mut row: Vec<f32> = (0..e)
                .map(|_| dtype.round(rng.random_range(-3.0f32..3.0)))
                .collect();
            inject(token, &mut row);
            let clear = biases.iter().all(|b| {
                reference::route(config, 1, &to64(&row), b.as_deref(), None)
                    .unwrap()
                    .margins[0]
                    >= MIN_MARGIN
            });
            if clear {
                logits.extend(row);
                break;
            }
        }
    }
    logits
}

fn uniform(n: usize, lo: f32, hi: f32, rng: &mut impl Rng) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

/// Host inputs of one routing problem.
struct Problem {
    config: RouterConfig,
    scores: Vec<Tensor>,
    bias: Option<Tensor>,
    router_scale: Option<Tensor>,
}

impl Problem {
    fn inputs(&self) -> HostInputs<'_> {
        HostInputs {
            scores: match self.scores.as_slice() {
                [logits] => Scores::Logits(logits),
                [hidden, weight] => Scores::Gate { hidden, weight },
                _ => unreachable!(),
            },
            bias: self.bias.as_ref(),
            router_scale: self.router_scale.as_ref(),
        }
    }

    fn logits64(&self) -> (usize, Vec<f64>) {
        match self.scores.as_slice() {
            [logits] => (logits.shape()[0], logits.to_f64()),
            [hidden, weight] => {
                let (t, h) = (hidden.shape()[0], hidden.shape()[1]);
                let e = self.config.experts;
                (
                    t,
                    reference::gate_logits(t, h, e, &hidden.to_f64(), &weight.to_f64()).unwrap(),
                )
            }
            _ => unreachable!(),
        }
    }

    fn reference(&self) -> (reference::RoutingRef, reference::LayoutRef) {
        let (t, logits) = self.logits64();
        let bias = self.bias.as_ref().map(Tensor::to_f64);
        let scale = self.router_scale.as_ref().map(Tensor::to_f64);
        let c = &self.config;
        let routing = reference::route(c, t, &logits, bias.as_deref(), scale.as_deref()).unwrap();
        let layout =
            reference::dispatch(&routing.ids, t, c.top_k, c.experts, c.groups, c.block_size)
                .unwrap();
        (routing, layout)
    }
}

/// A tie-free logits problem with an optional bias (±0.1) and router scale ([0.5, 1.5)).
fn logits_problem(
    config: RouterConfig,
    t: usize,
    bias: bool,
    scale: bool,
    dtype: DType,
    seed: u64,
) -> Problem {
    let mut r = rng(seed);
    let e = config.experts;
    let bias = bias.then(|| uniform(e, -0.1, 0.1, &mut r));
    let router_scale = scale.then(|| uniform(e, 0.5, 1.5, &mut r));
    // 16-bit logits are drawn tie-free after rounding: the reference sees what the GPU sees.
    let logits = draw_logits(&config, t, &[bias.as_deref()], dtype, &mut r, |_, _| {});
    Problem {
        config,
        scores: vec![Tensor::from_f32(&[t, e], &logits, dtype).unwrap()],
        bias: bias.map(|b| Tensor::f32(&[e], b).unwrap()),
        router_scale: router_scale.map(|s| Tensor::f32(&[e], s).unwrap()),
    }
}

fn run(gpu: &Gpu, p: &Problem) -> RouterOutput {
    merrouter::route_and_dispatch(gpu, &p.config, &p.inputs()).unwrap()
}

fn ints(t: &Tensor) -> Vec<i32> {
    t.as_i32().expect("i32 tensor").to_vec()
}

/// Every layout array equals the reference exactly (the order is fully specified: experts in
/// order, ascending slot within an expert, sentinels in padding rows).
fn assert_layout(what: &str, got: &HostLayout, want: &reference::LayoutRef) {
    for (name, g, w) in [
        ("counts", &got.counts, &want.counts),
        ("offsets", &got.offsets, &want.offsets),
        ("sorted_slots", &got.sorted_slots, &want.sorted_slots),
        ("slot_rows", &got.slot_rows, &want.slot_rows),
        ("block_experts", &got.block_experts, &want.block_experts),
        ("group_loads", &got.group_loads, &want.group_loads),
    ] {
        assert_eq!(&ints(g), w, "{what}: {name}");
    }
    let c = compare(
        got.imbalance.as_f32().unwrap(),
        &[want.imbalance],
        IMBALANCE_TOLERANCE,
    );
    assert!(c.pass, "{what}: imbalance {}", c.summary(&[1]));
    assert_layout_structure(what, got, want);
}

/// The layout as per-expert sets and its invariants, independently of the reference's order.
fn assert_layout_structure(what: &str, got: &HostLayout, want: &reference::LayoutRef) {
    let counts = ints(&got.counts);
    let offsets = ints(&got.offsets);
    let sorted = ints(&got.sorted_slots);
    let slot_rows = ints(&got.slot_rows);
    let slots = slot_rows.len() as i32;
    for (x, &c) in counts.iter().enumerate() {
        let segment = &sorted[offsets[x] as usize..offsets[x + 1] as usize];
        let members: BTreeSet<i32> = segment.iter().copied().filter(|&s| s != slots).collect();
        let expected: BTreeSet<i32> = want
            .sorted_slots
            .iter()
            .copied()
            .filter(|&s| s != slots && s >= 0)
            .filter(|&s| want.slot_rows[s as usize] >= want.offsets[x])
            .filter(|&s| want.slot_rows[s as usize] < want.offsets[x + 1])
            .collect();
        assert_eq!(members, expected, "{what}: slots of expert {x}");
        assert_eq!(members.len(), c as usize, "{what}: count of expert {x}");
    }
    for (slot, &row) in slot_rows.iter().enumerate() {
        assert_eq!(
            sorted[row as usize], slot as i32,
            "{what}: inverse map of slot {slot}"
        );
    }
}

fn assert_routing(what: &str, got: &RouterOutput, p: &Problem) {
    let (routing, layout) = p.reference();
    assert_eq!(ints(&got.topk_ids), routing.ids, "{what}: topk_ids");
    let c = compare(
        got.topk_weights.as_f32().unwrap(),
        &routing.weights,
        WEIGHT_TOLERANCE,
    );
    assert!(
        c.pass,
        "{what}: weights {}",
        c.summary(got.topk_weights.shape())
    );
    assert_layout(what, &got.layout, &layout);
}

fn moge_sigmoid_k_is_e() -> RouterConfig {
    RouterConfig {
        renormalize: true,
        routed_scaling_factor: 0.75,
        ..config(12, 3, 12, Scoring::Sigmoid, Selection::Moge)
    }
}

fn limited_softmax_k_is_e() -> RouterConfig {
    config(10, 2, 10, Scoring::Softmax, limited(2, GroupScore::Max))
}

/// (name, config, tokens, bias, router scale, logits dtype)
fn routing_table() -> Vec<(&'static str, RouterConfig, usize, bool, bool, DType)> {
    let pangu = RouterConfig::pangu_pro_moe();
    let deepseek = RouterConfig::deepseek_v3();
    vec![
        ("pangu t=1", pangu.clone(), 1, false, true, DType::F32),
        ("pangu t=7", pangu.clone(), 7, false, true, DType::F32),
        ("pangu t=4096", pangu.clone(), 4096, false, true, DType::F32),
        (
            "pangu bf16 logits",
            pangu.clone(),
            7,
            false,
            true,
            DType::BF16,
        ),
        ("deepseek t=1", deepseek.clone(), 1, true, false, DType::F32),
        ("deepseek t=7", deepseek.clone(), 7, true, false, DType::F32),
        (
            "deepseek t=4096",
            deepseek.clone(),
            4096,
            true,
            false,
            DType::F32,
        ),
        (
            "deepseek f16 logits",
            deepseek.clone(),
            7,
            true,
            false,
            DType::F16,
        ),
        (
            "deepseek without bias",
            deepseek.clone(),
            7,
            false,
            true,
            DType::F32,
        ),
        (
            "e=12 g=3 moge sigmoid k=e",
            moge_sigmoid_k_is_e(),
            7,
            true,
            true,
            DType::F32,
        ),
        (
            "e=10 g=2 limited softmax k=e",
            limited_softmax_k_is_e(),
            7,
            false,
            false,
            DType::F32,
        ),
        (
            "e=20 g=4 k_group=3 sum-top2 softmax bias",
            RouterConfig {
                renormalize: true,
                ..config(20, 4, 5, Scoring::Softmax, limited(3, GroupScore::SumTop2))
            },
            33,
            true,
            false,
            DType::F32,
        ),
        (
            "e=6 g=1 plain top-3 sigmoid",
            config(6, 1, 3, Scoring::Sigmoid, Selection::Moge),
            7,
            false,
            false,
            DType::F32,
        ),
        (
            "e=300 g=5 k_group=2 max sigmoid",
            config(300, 5, 9, Scoring::Sigmoid, limited(2, GroupScore::Max)),
            7,
            true,
            true,
            DType::F32,
        ),
        (
            "e=3 g=3 moge softmax (wg larger than e)",
            config(3, 3, 3, Scoring::Softmax, Selection::Moge),
            7,
            false,
            false,
            DType::F32,
        ),
    ]
}

#[test]
fn routing_and_layout_match_the_reference() {
    let g = gpu();
    for (seed, (name, config, t, bias, scale, dtype)) in routing_table().into_iter().enumerate() {
        let p = logits_problem(config, t, bias, scale, dtype, 100 + seed as u64);
        assert_routing(name, &run(g, &p), &p);
    }
}

#[test]
fn fallback_without_subgroups_matches_the_reference() {
    let g = gpu_without(&[Feature::Subgroups]);
    for (seed, (name, config, t, bias, scale, dtype)) in routing_table().into_iter().enumerate() {
        if t > 64 {
            continue;
        }
        let p = logits_problem(config, t, bias, scale, dtype, 200 + seed as u64);
        let inputs: Vec<_> = p.scores.iter().map(|s| g.upload(s).unwrap()).collect();
        let bias = p.bias.as_ref().map(|b| g.upload(b).unwrap());
        let scale = p.router_scale.as_ref().map(|s| g.upload(s).unwrap());
        let router = Router::new(
            &g,
            &p.config,
            &DeviceInputs {
                scores: Scores::Logits(&inputs[0]),
                bias: bias.as_ref(),
                router_scale: scale.as_ref(),
            },
        )
        .unwrap();
        assert!(router.variant().starts_with("workgroup-memory"), "{name}");
        g.run(|rec| router.record(rec)).unwrap();
        assert_routing(name, &router.download(&g).unwrap(), &p);
    }
}

#[test]
fn the_default_adapter_uses_subgroups_where_it_has_them() {
    let g = gpu();
    let p = logits_problem(
        RouterConfig::pangu_pro_moe(),
        3,
        false,
        false,
        DType::F32,
        7,
    );
    let logits = g.upload(&p.scores[0]).unwrap();
    let router = Router::new(
        g,
        &p.config,
        &DeviceInputs {
            scores: Scores::Logits(&logits),
            bias: None,
            router_scale: None,
        },
    )
    .unwrap();
    let expected = if g.caps.subgroups {
        "subgroup"
    } else {
        "workgroup-memory"
    };
    assert!(
        router.variant().starts_with(expected),
        "{}",
        router.variant()
    );
    assert_eq!(router.dispatches(), 3);
    let paths = OPERATOR.paths(g);
    assert_eq!(paths[0].0, "routing reductions");
}

#[test]
fn fused_gate_matches_the_reference() {
    let g = gpu();
    let pangu = RouterConfig::pangu_pro_moe();
    let deepseek = RouterConfig::deepseek_v3();
    // (name, config, t, h, dtype, bias, scale): t not a multiple of the gate tile, h not a
    // multiple of the hidden tile.
    let table = [
        (
            "pangu t=1 h=1 f32",
            pangu.clone(),
            1,
            1,
            DType::F32,
            false,
            true,
        ),
        (
            "pangu t=33 h=40 bf16",
            pangu.clone(),
            33,
            40,
            DType::BF16,
            false,
            true,
        ),
        (
            "deepseek t=7 h=64 f16",
            deepseek.clone(),
            7,
            64,
            DType::F16,
            true,
            false,
        ),
        (
            "e=12 moge k=e t=9 h=33 f32",
            moge_sigmoid_k_is_e(),
            9,
            33,
            DType::F32,
            true,
            false,
        ),
    ];
    for (seed, (name, config, t, h, dtype, bias, scale)) in table.into_iter().enumerate() {
        let e = config.experts;
        let mut r = rng(300 + seed as u64);
        let bias = bias.then(|| uniform(e, -0.1, 0.1, &mut r));
        let scale = scale.then(|| uniform(e, 0.5, 1.5, &mut r));
        let b64 = bias.as_deref().map(to64);
        let (hidden, weight) =
            merrouter::tie_free_gate(&config, t, h, b64.as_deref(), 400 + seed as u64).unwrap();
        let p = Problem {
            config,
            scores: vec![
                Tensor::from_f32(&[t, h], &hidden, dtype).unwrap(),
                Tensor::from_f32(&[h, e], &weight, dtype).unwrap(),
            ],
            bias: bias.map(|b| Tensor::f32(&[e], b).unwrap()),
            router_scale: scale.map(|s| Tensor::f32(&[e], s).unwrap()),
        };
        assert_routing(name, &run(g, &p), &p);
    }
}

/// All-equal logits: every choice is a tie, so the lowest indices the mode allows win.
#[test]
fn ties_go_to_the_lower_index() {
    let g = gpu();
    let flat = |c: &RouterConfig, t: usize| {
        Tensor::f32(&[t, c.experts], vec![0.5; t * c.experts]).unwrap()
    };
    // MoGE: the first k/g experts of every group, group by group.
    let moge = config(12, 3, 6, Scoring::Softmax, Selection::Moge);
    let out = merrouter::route_and_dispatch(
        g,
        &moge,
        &HostInputs {
            scores: Scores::Logits(&flat(&moge, 2)),
            bias: None,
            router_scale: None,
        },
    )
    .unwrap();
    assert_eq!(ints(&out.topk_ids), [0, 1, 4, 5, 8, 9, 0, 1, 4, 5, 8, 9]);
    assert!(
        out.topk_weights
            .to_f32()
            .iter()
            .all(|&w| (w - 1.0 / 12.0).abs() < 1e-7)
    );

    // Group-limited: all groups tie, so groups 0 and 1 are kept; then experts 0..k.
    for score in [GroupScore::Max, GroupScore::SumTop2] {
        let c = config(16, 4, 5, Scoring::Sigmoid, limited(2, score));
        let bias = Tensor::f32(&[16], vec![0.25; 16]).unwrap();
        let out = merrouter::route_and_dispatch(
            g,
            &c,
            &HostInputs {
                scores: Scores::Logits(&flat(&c, 1)),
                bias: Some(&bias),
                router_scale: None,
            },
        )
        .unwrap();
        assert_eq!(ints(&out.topk_ids), [0, 1, 2, 3, 4], "{score:?}");
    }

    // Partial ties: equal values at the selection boundary and between groups; the reference
    // implements the same rule, checked here against hand-made expectations too.
    let c = config(8, 2, 3, Scoring::Sigmoid, limited(1, GroupScore::SumTop2));
    // Both groups sum sigmoid(1.0) + sigmoid(0.5), so group 0 is kept; within it 1.0 comes first,
    // then the two 0.5s in index order: ids 0, 1, 2.
    let logits = Tensor::f32(&[1, 8], vec![1.0, 0.5, 0.5, 0.25, 0.5, 1.0, -1.0, 0.5]).unwrap();
    let p = Problem {
        config: c,
        scores: vec![logits],
        bias: None,
        router_scale: None,
    };
    let out = run(g, &p);
    assert_eq!(ints(&out.topk_ids), [0, 1, 2]);
    assert_routing("partial ties", &out, &p);
}

/// NaN logits never select an out-of-range or repeated id; ids and the NaN pattern of the
/// weights follow the documented rule (NaN ranks last; with softmax it poisons the token).
#[test]
fn nan_logits_never_select_an_out_of_range_id() {
    let fallback = gpu_without(&[Feature::Subgroups]);
    for g in [gpu(), &fallback] {
        let configs = [
            RouterConfig::pangu_pro_moe(),
            RouterConfig::deepseek_v3(),
            config(12, 3, 12, Scoring::Sigmoid, Selection::Moge),
            config(20, 4, 6, Scoring::Softmax, limited(2, GroupScore::SumTop2)),
        ];
        for (seed, c) in configs.into_iter().enumerate() {
            let (t, e, size) = (6, c.experts, c.group_size());
            let mut r = rng(500 + seed as u64);
            let bias = uniform(e, -0.1, 0.1, &mut r);
            // Token 0: one NaN; 1: every other logit NaN; 2: all NaN; 3: +inf and -inf;
            // 4: a NaN in every group; 5: clean.
            let inject = |token: usize, row: &mut [f32]| match token {
                0 => row[3] = f32::NAN,
                1 => row.iter_mut().step_by(2).for_each(|v| *v = f32::NAN),
                2 => row.fill(f32::NAN),
                3 => {
                    row[1] = f32::INFINITY;
                    row[2] = f32::NEG_INFINITY;
                }
                4 => row.iter_mut().step_by(size).for_each(|v| *v = f32::NAN),
                _ => {}
            };
            let logits = draw_logits(&c, t, &[None, Some(&bias)], DType::F32, &mut r, inject);
            for with_bias in [false, true] {
                let p = Problem {
                    config: c.clone(),
                    scores: vec![Tensor::f32(&[t, e], logits.clone()).unwrap()],
                    bias: with_bias.then(|| Tensor::f32(&[e], bias.clone()).unwrap()),
                    router_scale: None,
                };
                let out = run(g, &p);
                let ids = ints(&out.topk_ids);
                for row in ids.chunks(c.top_k) {
                    let distinct: BTreeSet<i32> = row.iter().copied().collect();
                    assert_eq!(distinct.len(), row.len(), "{c:?}: repeated id in {row:?}");
                    assert!(row.iter().all(|&x| x >= 0 && (x as usize) < e), "{row:?}");
                }
                let weights = out.topk_weights.to_f32();
                if c.scoring == Scoring::Softmax {
                    // One NaN poisons the token's softmax; a clean token stays finite.
                    assert!(weights[..c.top_k].iter().all(|w| w.is_nan()));
                    assert!(weights[5 * c.top_k..].iter().all(|w| w.is_finite()));
                }
                assert_routing(&format!("NaN {c:?} bias {with_bias}"), &out, &p);
            }
        }
    }
}

#[test]
fn padding_and_block_experts_match_the_reference() {
    let g = gpu();
    // t = 300 spans two scatter blocks of 256 tokens.
    for (seed, (t, block)) in [(1, 16), (7, 64), (300, 7), (300, 1), (5, 1024)]
        .into_iter()
        .enumerate()
    {
        let c = RouterConfig {
            block_size: block,
            ..RouterConfig::deepseek_v3()
        };
        let p = logits_problem(c, t, true, false, DType::F32, 600 + seed as u64);
        let out = run(g, &p);
        assert_routing(&format!("t={t} block={block}"), &out, &p);
        let offsets = ints(&out.layout.offsets);
        assert!(offsets.iter().all(|&o| (o as usize).is_multiple_of(block)));
        let sentinel = (t * 8) as i32;
        let padding = ints(&out.layout.sorted_slots)
            .iter()
            .filter(|&&s| s == sentinel)
            .count();
        assert_eq!(padding, out.layout.sorted_slots.numel() - t * 8);
    }
}

/// (name, t, k, e, groups, block size, ids)
type GivenIds = (&'static str, usize, usize, usize, usize, usize, Vec<i32>);

#[test]
fn dispatch_of_given_ids_matches_the_reference() {
    let g = gpu();
    let mut r = rng(700);
    let mut table: Vec<GivenIds> = vec![
        ("all tokens to expert 3", 600, 1, 5, 1, 1, vec![3; 600]),
        (
            "empty experts, padded",
            9,
            2,
            10,
            5,
            4,
            (0..18).map(|s| [1, 8][s % 2]).collect(),
        ),
        ("k = e", 3, 6, 6, 2, 1, (0..18).map(|s| 5 - s % 6).collect()),
    ];
    let random: Vec<i32> = (0..513)
        .flat_map(|_| {
            let mut row: Vec<i32> = (0..37).collect();
            for i in 0..4 {
                let j = r.random_range(i..37);
                row.swap(i, j);
            }
            row[..4].to_vec()
        })
        .collect();
    table.push(("random t=513 e=37", 513, 4, 37, 1, 3, random));
    for (name, t, k, e, groups, block, ids) in table {
        let host = Tensor::i32(&[t, k], ids.clone()).unwrap();
        let got = merrouter::dispatch(g, &host, e, groups, block).unwrap();
        let want = reference::dispatch(&ids, t, k, e, groups, block).unwrap();
        assert_layout(name, &got, &want);
    }
}

/// Device ids cannot be checked on the host: out-of-range ids must stay out of the layout (their
/// slots get row -1) and a repeated expert shares one row, with every row and slot in range.
#[test]
fn bad_device_ids_stay_out_of_the_layout() {
    let g = gpu();
    let (t, k, e, block) = (5, 3, 4, 2);
    #[rustfmt::skip]
    let ids = vec![
        0, 1, 2,
        -5, 3, 4,           // negative, then one past the experts
        1, 1, i32::MAX,     // repeated, then far out of range
        i32::MIN, 2, 0,
        3, 2, 1,
    ];
    let dev = g
        .upload(&Tensor::i32(&[t, k], ids.clone()).unwrap())
        .unwrap();
    let dispatcher = Dispatcher::new(g, &dev, e, 1, block).unwrap();
    g.run(|rec| dispatcher.record(rec)).unwrap();
    let layout = dispatcher.layout().download(g).unwrap();
    let (offsets, sorted, rows) = (
        ints(&layout.offsets),
        ints(&layout.sorted_slots),
        ints(&layout.slot_rows),
    );
    let sentinel = (t * k) as i32;
    let capacity = sorted.len() as i32;
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]) && offsets[e] <= capacity);
    assert!(sorted.iter().all(|&s| (0..=sentinel).contains(&s)));
    for (slot, (&id, &row)) in ids.iter().zip(&rows).enumerate() {
        if !(0..e as i32).contains(&id) {
            assert_eq!(row, -1, "slot {slot} (id {id})");
            continue;
        }
        let x = id as usize;
        assert!(
            (offsets[x]..offsets[x + 1]).contains(&row),
            "slot {slot}: row {row} outside expert {x}"
        );
    }
    // The repeated expert of token 2 (slots 6 and 7) shares one row, which holds one of them.
    assert_eq!(rows[6], rows[7]);
    assert!([6, 7].contains(&sorted[rows[6] as usize]));
    // The counts hold the valid ids only, each (token, expert) pair once.
    let counts = ints(&layout.counts);
    assert_eq!(counts, vec![2, 3, 3, 2]);
}

#[test]
fn moge_is_balanced_and_group_limited_is_not() {
    let g = gpu();
    let pangu = logits_problem(
        RouterConfig::pangu_pro_moe(),
        64,
        false,
        true,
        DType::F32,
        800,
    );
    let out = run(g, &pangu);
    assert_eq!(ints(&out.layout.group_loads), vec![64; 8]);
    assert_eq!(out.layout.imbalance.to_f32(), vec![0.0]);
    let deepseek = logits_problem(
        RouterConfig::deepseek_v3(),
        64,
        true,
        false,
        DType::F32,
        801,
    );
    let out = run(g, &deepseek);
    assert!(out.layout.imbalance.to_f32()[0] > 0.0);
    assert_routing("deepseek imbalance", &out, &deepseek);
}

/// Route, dispatch and combine recorded into one command buffer; y rows are in sorted-slot order
/// with NaN in padding rows (a read of one would poison the output).
#[test]
fn combine_after_routing_matches_the_reference() {
    let g = gpu();
    // (y dtype, out dtype, n): odd n makes 16-bit output words straddle two tokens.
    let table = [
        (DType::F32, DType::F32, 16),
        (DType::BF16, DType::BF16, 33),
        (DType::F16, DType::F32, 7),
        (DType::F32, DType::F16, 1),
    ];
    for (seed, (y_dtype, out_dtype, n)) in table.into_iter().enumerate() {
        let c = RouterConfig {
            block_size: 4,
            ..RouterConfig::deepseek_v3()
        };
        let p = logits_problem(c.clone(), 9, true, false, DType::F32, 900 + seed as u64);
        let (routing, layout) = p.reference();
        let (t, k) = (9, c.top_k);
        let rows = layout.sorted_slots.len();
        let mut r = rng(950 + seed as u64);
        let mut y = vec![f32::NAN; rows * n];
        for (row, &slot) in layout.sorted_slots.iter().enumerate() {
            if slot != (t * k) as i32 {
                y[row * n..(row + 1) * n].copy_from_slice(&uniform(n, -2.0, 2.0, &mut r));
            }
        }
        let y_host = Tensor::from_f32(&[rows, n], &y, y_dtype).unwrap();
        let logits = g.upload(&p.scores[0]).unwrap();
        let bias = g.upload(p.bias.as_ref().unwrap()).unwrap();
        let router = Router::new(
            g,
            &c,
            &DeviceInputs {
                scores: Scores::Logits(&logits),
                bias: Some(&bias),
                router_scale: None,
            },
        )
        .unwrap();
        let y_dev = g.upload(&y_host).unwrap();
        let out = g.zeros(&[t, n], out_dtype).unwrap();
        let combiner = Combiner::new(
            g,
            &router.routing().topk_weights,
            &router.layout().slot_rows,
            &y_dev,
            &out,
        )
        .unwrap();
        g.run(|rec| {
            router.record(rec)?;
            combiner.record(rec)
        })
        .unwrap();
        let weights = router.download(g).unwrap().topk_weights.to_f32();
        let want = reference::combine(
            t,
            k,
            n,
            &to64(&weights),
            &layout.slot_rows,
            &y_host.to_f64(),
        )
        .unwrap();
        let got = g.download_f32(&out).unwrap();
        let cmp = compare(&got, &want, combine_tolerance(out_dtype));
        assert!(
            cmp.pass,
            "{y_dtype}->{out_dtype} n={n}: {}",
            cmp.summary(&[t, n])
        );
        // And the weights it used are the reference's.
        assert!(compare(&weights, &routing.weights, WEIGHT_TOLERANCE).pass);
    }
}

#[test]
fn host_combine_skips_missing_rows() {
    let g = gpu();
    let weights = Tensor::f32(&[2, 2], vec![0.5, 2.0, 1.0, 3.0]).unwrap();
    let rows = Tensor::i32(&[2, 2], vec![1, -1, 0, 2]).unwrap();
    let y = Tensor::f32(&[3, 2], vec![1.0, 2.0, 10.0, 20.0, 100.0, 200.0]).unwrap();
    let out = merrouter::combine(g, &weights, &rows, &y, DType::F32).unwrap();
    assert_eq!(out.to_f32(), vec![5.0, 10.0, 301.0, 602.0]);
    // Device rows are not checked on the host: rows past y (or below -1) contribute nothing.
    let bad_rows = Tensor::i32(&[2, 2], vec![1, 3, i32::MIN, 2]).unwrap();
    let (w_dev, rows_dev, y_dev) = (
        g.upload(&weights).unwrap(),
        g.upload(&bad_rows).unwrap(),
        g.upload(&y).unwrap(),
    );
    let out_dev = g.zeros(&[2, 2], DType::F32).unwrap();
    let combiner = Combiner::new(g, &w_dev, &rows_dev, &y_dev, &out_dev).unwrap();
    g.run(|rec| combiner.record(rec)).unwrap();
    assert_eq!(
        g.download_f32(&out_dev).unwrap(),
        vec![5.0, 10.0, 300.0, 600.0]
    );
}

/// The unfused baseline chain writes the same outputs; it must be correct to be a fair baseline.
#[test]
fn unfused_chain_matches_the_reference() {
    let g = gpu();
    let table = [
        ("pangu", RouterConfig::pangu_pro_moe(), false, true),
        (
            "deepseek block 16",
            RouterConfig {
                block_size: 16,
                ..RouterConfig::deepseek_v3()
            },
            true,
            false,
        ),
        ("e=12 k=e", moge_sigmoid_k_is_e(), true, true),
    ];
    for (seed, (name, c, bias, scale)) in table.into_iter().enumerate() {
        let p = logits_problem(c.clone(), 300, bias, scale, DType::F32, 1000 + seed as u64);
        let logits = g.upload(&p.scores[0]).unwrap();
        let bias = p.bias.as_ref().map(|b| g.upload(b).unwrap());
        let scale = p.router_scale.as_ref().map(|s| g.upload(s).unwrap());
        let router = Router::new(
            g,
            &c,
            &DeviceInputs {
                scores: Scores::Logits(&logits),
                bias: bias.as_ref(),
                router_scale: scale.as_ref(),
            },
        )
        .unwrap();
        let chain = router.unfused_chain(g).unwrap();
        assert!(chain.dispatches() > router.dispatches());
        g.run(|rec| chain.record(rec)).unwrap();
        assert_routing(name, &router.download(g).unwrap(), &p);
    }
    // With the fused gate the chain starts with its own GEMV.
    let c = RouterConfig::pangu_pro_moe();
    let (hidden, weight) = merrouter::tie_free_gate(&c, 5, 24, None, 1100).unwrap();
    let hidden = g.upload(&Tensor::f32(&[5, 24], hidden).unwrap()).unwrap();
    let weight = g.upload(&Tensor::f32(&[24, 64], weight).unwrap()).unwrap();
    let router = Router::new(
        g,
        &c,
        &DeviceInputs {
            scores: Scores::Gate {
                hidden: &hidden,
                weight: &weight,
            },
            bias: None,
            router_scale: None,
        },
    )
    .unwrap();
    g.run(|rec| router.record(rec)).unwrap();
    let fused = router.download(g).unwrap();
    let chain = router.unfused_chain(g).unwrap();
    g.run(|rec| chain.record(rec)).unwrap();
    let unfused = router.download(g).unwrap();
    assert_eq!(fused.topk_ids, unfused.topk_ids);
    assert_eq!(fused.layout, unfused.layout);
    assert!(
        compare(
            &unfused.topk_weights.to_f32(),
            &fused.topk_weights.to_f32(),
            WEIGHT_TOLERANCE
        )
        .pass
    );
}

#[test]
fn registry_cases_and_baselines_pass() {
    let g = gpu();
    let cases = OPERATOR.cases(Scale::Ci, g);
    assert!(!cases.is_empty());
    let mut baselines = 0;
    for case in cases {
        let info = case.info();
        let row = fusedops::bench::check_case(case.as_ref(), g);
        assert!(row.pass, "{}: {}", info.name, row.summary());
        let prepared = case.prepare(g).unwrap();
        if prepared.baseline().is_some() {
            g.run(|rec| prepared.record_baseline(rec)).unwrap();
            let checks = prepared.verify().unwrap();
            assert!(!checks.is_empty(), "{}: nothing verified", info.name);
            for checked in checks {
                assert!(
                    checked.comparison.pass,
                    "{} baseline {}",
                    info.name, checked.output
                );
            }
            baselines += 1;
        }
    }
    assert!(baselines > 0, "no CI case has a baseline to check");
}

#[test]
fn run_named_agrees_with_reference_named() {
    let g = gpu();
    let c = RouterConfig {
        block_size: 4,
        ..RouterConfig::deepseek_v3()
    };
    let p = logits_problem(c.clone(), 5, true, false, DType::F32, 1200);
    let rows = reference::row_capacity(5, 8, 256, 4).unwrap();
    let mut r = rng(1201);
    let mut inputs = NamedTensors::new();
    inputs.insert("logits".into(), p.scores[0].clone());
    inputs.insert("bias".into(), p.bias.clone().unwrap());
    inputs.insert(
        "y".into(),
        Tensor::f32(&[rows, 3], uniform(rows * 3, -1.0, 1.0, &mut r)).unwrap(),
    );
    let params = serde_json::json!({"preset": "deepseek-v3", "block_size": 4});
    let got = OPERATOR.run_named(g, &inputs, &params).unwrap();
    let want = OPERATOR.reference_named(&inputs, &params).unwrap();
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (name, w) in &want {
        let c = compare(
            &got[name].to_f32(),
            &w.to_f32(),
            OPERATOR.tolerance(name, &inputs, &params),
        );
        assert!(c.pass, "{name}: {}", c.summary(w.shape()));
    }
    let bad = serde_json::json!({"preset": "deepseek-v3", "selection": "random"});
    assert!(OPERATOR.run_named(g, &inputs, &bad).is_err());
    let typo = serde_json::json!({"topk": 4});
    assert!(OPERATOR.reference_named(&inputs, &typo).is_err());
}

/// A bad routing problem and the error it must get.
type Refusal<'a> = (
    &'static str,
    RouterConfig,
    DeviceInputs<'a>,
    fn(&Error) -> bool,
);

/// Bad input returns a typed error before anything is compiled or recorded.
#[test]
fn bad_input_is_refused_and_dispatches_nothing() {
    let g = gpu_without(&[]);
    let before = g.cached_pipelines();
    let deepseek = RouterConfig::deepseek_v3();
    let t = 4;
    let logits = g
        .upload(&Tensor::f32(&[t, 256], vec![0.0; t * 256]).unwrap())
        .unwrap();
    let short = g
        .upload(&Tensor::f32(&[t, 255], vec![0.0; t * 255]).unwrap())
        .unwrap();
    let ids = g
        .upload(&Tensor::i32(&[t, 256], vec![0; t * 256]).unwrap())
        .unwrap();
    let bias = g
        .upload(&Tensor::f32(&[256], vec![0.0; 256]).unwrap())
        .unwrap();
    let bias_short = g
        .upload(&Tensor::f32(&[128], vec![0.0; 128]).unwrap())
        .unwrap();
    let hidden = g
        .upload(&Tensor::f32(&[t, 16], vec![0.0; t * 16]).unwrap())
        .unwrap();
    let weight_wrong = g
        .upload(&Tensor::f32(&[15, 256], vec![0.0; 15 * 256]).unwrap())
        .unwrap();
    let int_bias = g
        .upload(&Tensor::i32(&[256], vec![0; 256]).unwrap())
        .unwrap();
    let cases: Vec<Refusal> = vec![
        (
            "e not divisible by g",
            (RouterConfig {
                groups: 3,
                ..deepseek.clone()
            }),
            DeviceInputs {
                scores: Scores::Logits(&logits),
                bias: None,
                router_scale: None,
            },
            |e| matches!(e, Error::Invalid { .. }),
        ),
        (
            "k not divisible by g in MoGE",
            (RouterConfig {
                selection: Selection::Moge,
                top_k: 4,
                ..deepseek.clone()
            }),
            DeviceInputs {
                scores: Scores::Logits(&logits),
                bias: None,
                router_scale: None,
            },
            |e| matches!(e, Error::Invalid { .. }),
        ),
        (
            "k_group > g",
            (RouterConfig {
                selection: limited(9, GroupScore::Max),
                ..deepseek.clone()
            }),
            DeviceInputs {
                scores: Scores::Logits(&logits),
                bias: None,
                router_scale: None,
            },
            |e| matches!(e, Error::Invalid { .. }),
        ),
        (
            "k > e",
            (RouterConfig {
                top_k: 257,
                ..deepseek.clone()
            }),
            DeviceInputs {
                scores: Scores::Logits(&logits),
                bias: None,
                router_scale: None,
            },
            |e| matches!(e, Error::Invalid { .. }),
        ),
        (
            "logits of the wrong width",
            deepseek.clone(),
            DeviceInputs {
                scores: Scores::Logits(&short),
                bias: None,
                router_scale: None,
            },
            |e| matches!(e, Error::Shape { .. }),
        ),
        (
            "integer logits",
            deepseek.clone(),
            DeviceInputs {
                scores: Scores::Logits(&ids),
                bias: None,
                router_scale: None,
            },
            |e| matches!(e, Error::Unsupported { .. }),
        ),
        (
            "bias of the wrong length",
            deepseek.clone(),
            DeviceInputs {
                scores: Scores::Logits(&logits),
                bias: Some(&bias_short),
                router_scale: None,
            },
            |e| matches!(e, Error::Shape { .. }),
        ),
        (
            "integer bias",
            deepseek.clone(),
            DeviceInputs {
                scores: Scores::Logits(&logits),
                bias: Some(&int_bias),
                router_scale: None,
            },
            |e| matches!(e, Error::Shape { .. }),
        ),
        (
            "router scale of the wrong length",
            deepseek.clone(),
            DeviceInputs {
                scores: Scores::Logits(&logits),
                bias: Some(&bias),
                router_scale: Some(&bias_short),
            },
            |e| matches!(e, Error::Shape { .. }),
        ),
        (
            "gate weight rows differ from hidden columns",
            deepseek.clone(),
            DeviceInputs {
                scores: Scores::Gate {
                    hidden: &hidden,
                    weight: &weight_wrong,
                },
                bias: None,
                router_scale: None,
            },
            |e| matches!(e, Error::Shape { .. }),
        ),
    ];
    for (name, config, inputs, expected) in cases {
        let mut encoder = g.device.create_command_encoder(&Default::default());
        let mut rec = Recorder::new(&mut encoder);
        let err = Router::new(&g, &config, &inputs)
            .and_then(|router| router.record(&mut rec))
            .expect_err(name);
        assert!(expected(&err), "{name}: {err}");
        assert!(rec.pass_labels().is_empty(), "{name}: recorded a pass");
    }

    // Dispatch of given ids: wrong dtype, bad groups; host ids out of range or repeated.
    let f32_ids = g
        .upload(&Tensor::f32(&[2, 2], vec![0.0; 4]).unwrap())
        .unwrap();
    assert!(matches!(
        Dispatcher::new(&g, &f32_ids, 4, 1, 1),
        Err(Error::Unsupported { .. })
    ));
    let int_ids = g
        .upload(&Tensor::i32(&[2, 2], vec![0, 1, 2, 3]).unwrap())
        .unwrap();
    assert!(matches!(
        Dispatcher::new(&g, &int_ids, 4, 3, 1),
        Err(Error::Invalid { .. })
    ));
    assert!(matches!(
        Dispatcher::new(&g, &int_ids, 1, 1, 1),
        Err(Error::Invalid { .. })
    ));
    for ids in [vec![0, 4, 1, 2], vec![0, 0, 1, 2], vec![-1, 0, 1, 2]] {
        let host = Tensor::i32(&[2, 2], ids.clone()).unwrap();
        assert!(
            matches!(
                merrouter::dispatch(&g, &host, 4, 1, 1),
                Err(Error::Invalid { .. })
            ),
            "{ids:?}"
        );
    }

    // Combine: mismatched shapes leave the output untouched.
    let out = g
        .upload(&Tensor::f32(&[2, 3], vec![7.0; 6]).unwrap())
        .unwrap();
    let weights = g
        .upload(&Tensor::f32(&[2, 2], vec![1.0; 4]).unwrap())
        .unwrap();
    let rows = g
        .upload(&Tensor::i32(&[2, 2], vec![0; 4]).unwrap())
        .unwrap();
    let rows_wrong = g
        .upload(&Tensor::i32(&[2, 3], vec![0; 6]).unwrap())
        .unwrap();
    let y = g
        .upload(&Tensor::f32(&[4, 3], vec![1.0; 12]).unwrap())
        .unwrap();
    let y_wrong = g
        .upload(&Tensor::f32(&[4, 2], vec![1.0; 8]).unwrap())
        .unwrap();
    assert!(matches!(
        Combiner::new(&g, &weights, &rows_wrong, &y, &out),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        Combiner::new(&g, &weights, &rows, &y_wrong, &out),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        Combiner::new(&g, &weights, &rows, &y, &ids),
        Err(Error::Unsupported { .. })
    ));
    assert_eq!(g.download_f32(&out).unwrap(), vec![7.0; 6]);
    let host_rows = Tensor::i32(&[2, 2], vec![0, 4, 1, 2]).unwrap();
    let host_y = Tensor::f32(&[4, 3], vec![1.0; 12]).unwrap();
    let host_w = Tensor::f32(&[2, 2], vec![1.0; 4]).unwrap();
    assert!(matches!(
        merrouter::combine(&g, &host_w, &host_rows, &host_y, DType::F32),
        Err(Error::Invalid { .. })
    ));

    // The convenience call refuses before uploading anything.
    let host_logits = Tensor::f32(&[1, 10], vec![0.0; 10]).unwrap();
    let err = merrouter::route_and_dispatch(
        &g,
        &deepseek,
        &HostInputs {
            scores: Scores::Logits(&host_logits),
            bias: None,
            router_scale: None,
        },
    );
    assert!(matches!(err, Err(Error::Shape { .. })));
    assert_eq!(
        g.cached_pipelines(),
        before,
        "a refused call compiled a kernel"
    );
}

/// Serving loops route empty batches (vLLM returns empty outputs): t = 0 gives empty ids and
/// weights, an empty layout (zero counts, offsets and loads, no rows, imbalance 0), and records
/// no pass, through the fused router, the fused gate, given ids, the combine and the references.
#[test]
fn empty_batches_give_empty_outputs_and_dispatch_nothing() {
    let g = gpu();
    let c = RouterConfig {
        block_size: 4,
        ..RouterConfig::deepseek_v3()
    };
    let (e, k) = (c.experts, c.top_k);
    let logits = Tensor::f32(&[0, e], vec![]).unwrap();
    let bias = Tensor::from_f32(&[e], &vec![0.01; e], DType::BF16).unwrap();
    let hidden = Tensor::from_f32(&[0, 24], &[], DType::BF16).unwrap();
    let weight = Tensor::f32(&[24, e], vec![0.5; 24 * e]).unwrap();
    let want = reference::dispatch(&[], 0, k, e, c.groups, c.block_size).unwrap();
    assert_eq!(want.counts, vec![0; e]);
    assert_eq!(want.offsets, vec![0; e + 1]);
    assert!(want.sorted_slots.is_empty() && want.block_experts.is_empty());
    assert_eq!(want.imbalance, 0.0);
    let routing = reference::route(&c, 0, &[], Some(&bias.to_f64()), None).unwrap();
    assert!(routing.ids.is_empty() && routing.weights.is_empty());
    for (name, scores) in [
        ("logits", Scores::Logits(&logits)),
        (
            "fused gate",
            Scores::Gate {
                hidden: &hidden,
                weight: &weight,
            },
        ),
    ] {
        let inputs = HostInputs {
            scores,
            bias: Some(&bias),
            router_scale: None,
        };
        let out = merrouter::route_and_dispatch(g, &c, &inputs).unwrap();
        assert_eq!(out.topk_ids.shape(), &[0, k], "{name}");
        assert_eq!(out.topk_weights.shape(), &[0, k], "{name}");
        assert_eq!(out.layout.slot_rows.shape(), &[0, k], "{name}");
        assert_layout(name, &out.layout, &want);

        // The device router records nothing at all.
        let up = |t: &Tensor| g.upload(t).unwrap();
        let (first, second) = match inputs.scores {
            Scores::Logits(l) => (up(l), None),
            Scores::Gate { hidden, weight } => (up(hidden), Some(up(weight))),
        };
        let bias_dev = up(&bias);
        let router = Router::new(
            g,
            &c,
            &DeviceInputs {
                scores: match &second {
                    None => Scores::Logits(&first),
                    Some(weight) => Scores::Gate {
                        hidden: &first,
                        weight,
                    },
                },
                bias: Some(&bias_dev),
                router_scale: None,
            },
        )
        .unwrap();
        assert_eq!(router.dispatches(), 0, "{name}");
        let chain = router.unfused_chain(g).unwrap();
        assert_eq!(chain.dispatches(), 0, "{name}");
        let mut encoder = g.device.create_command_encoder(&Default::default());
        let mut rec = Recorder::new(&mut encoder);
        router.record(&mut rec).unwrap();
        chain.record(&mut rec).unwrap();
        assert!(rec.pass_labels().is_empty(), "{name}: recorded a pass");
    }

    // Given ids: the host convenience and the device dispatcher.
    let ids = Tensor::i32(&[0, k], vec![]).unwrap();
    let layout = merrouter::dispatch(g, &ids, e, c.groups, c.block_size).unwrap();
    assert_layout("given ids", &layout, &want);
    let ids_dev = g.upload(&ids).unwrap();
    let dispatcher = Dispatcher::new(g, &ids_dev, e, c.groups, c.block_size).unwrap();
    let mut encoder = g.device.create_command_encoder(&Default::default());
    let mut rec = Recorder::new(&mut encoder);
    dispatcher.record(&mut rec).unwrap();
    assert!(
        rec.pass_labels().is_empty(),
        "the dispatcher recorded a pass"
    );

    // The combine of no tokens: out [0, n], in every output dtype.
    let weights = Tensor::f32(&[0, k], vec![]).unwrap();
    let slot_rows = Tensor::i32(&[0, k], vec![]).unwrap();
    let y = Tensor::from_f32(&[0, 7], &[], DType::BF16).unwrap();
    for out_dtype in [DType::F32, DType::F16, DType::BF16] {
        let out = merrouter::combine(g, &weights, &slot_rows, &y, out_dtype).unwrap();
        assert_eq!((out.shape(), out.dtype()), (&[0, 7][..], out_dtype));
    }
    assert!(
        reference::combine(0, k, 7, &[], &[], &[])
            .unwrap()
            .is_empty()
    );
}

/// sglang's DeepSeek tests route with a bf16 correction bias: bias and router scale are accepted
/// as f32, f16 or bf16, widened exactly, on the fused router (logits and fused gate) and the
/// unfused chain, and agree with the reference over the same widened values.
#[test]
fn bias_and_router_scale_in_16_bits() {
    let g = gpu();
    let table = [
        ("bf16 bias", DType::BF16, DType::F32),
        ("f16 bias, bf16 scale", DType::F16, DType::BF16),
        ("f32 bias, f16 scale", DType::F32, DType::F16),
    ];
    for (seed, (name, bias_dtype, scale_dtype)) in table.into_iter().enumerate() {
        let c = RouterConfig {
            block_size: 2,
            ..RouterConfig::deepseek_v3()
        };
        let (t, e) = (37, c.experts);
        let mut r = rng(1300 + seed as u64);
        let bias: Vec<f32> = uniform(e, -0.1, 0.1, &mut r)
            .iter()
            .map(|&b| bias_dtype.round(b))
            .collect();
        let scale: Vec<f32> = uniform(e, 0.5, 1.5, &mut r)
            .iter()
            .map(|&s| scale_dtype.round(s))
            .collect();
        let logits = draw_logits(&c, t, &[Some(&bias)], DType::F32, &mut r, |_, _| {});
        let p = Problem {
            config: c.clone(),
            scores: vec![Tensor::f32(&[t, e], logits).unwrap()],
            bias: Some(Tensor::from_f32(&[e], &bias, bias_dtype).unwrap()),
            router_scale: Some(Tensor::from_f32(&[e], &scale, scale_dtype).unwrap()),
        };
        assert_routing(name, &run(g, &p), &p);
        let up = |t: &Tensor| g.upload(t).unwrap();
        let (logits, bias, scale) = (
            up(&p.scores[0]),
            up(p.bias.as_ref().unwrap()),
            up(p.router_scale.as_ref().unwrap()),
        );
        let router = Router::new(
            g,
            &c,
            &DeviceInputs {
                scores: Scores::Logits(&logits),
                bias: Some(&bias),
                router_scale: Some(&scale),
            },
        )
        .unwrap();
        let chain = router.unfused_chain(g).unwrap();
        g.run(|rec| chain.record(rec)).unwrap();
        assert_routing(&format!("{name} unfused"), &router.download(g).unwrap(), &p);
    }
    // The fused gate with a bf16 bias (the MoE layer's path).
    let c = RouterConfig::deepseek_v3();
    let bias: Vec<f32> = (0..256)
        .map(|x| DType::BF16.round(0.0004 * x as f32))
        .collect();
    let (hidden, weight) = merrouter::tie_free_gate(&c, 6, 24, Some(&to64(&bias)), 1310).unwrap();
    let p = Problem {
        config: c,
        scores: vec![
            Tensor::f32(&[6, 24], hidden).unwrap(),
            Tensor::f32(&[24, 256], weight).unwrap(),
        ],
        bias: Some(Tensor::from_f32(&[256], &bias, DType::BF16).unwrap()),
        router_scale: None,
    };
    assert_routing("fused gate, bf16 bias", &run(g, &p), &p);
}

/// vLLM's bound: with t·k < e at most t·k experts receive a slot, so the padded layout needs
/// t·k·block rows, not t·k + e·(block − 1) (DeepSeek-V3, one token, block 64: 512, not 16 136).
#[test]
fn padded_layout_uses_the_tighter_bound() {
    let g = gpu();
    assert_eq!(reference::row_capacity(1, 8, 256, 64).unwrap(), 512);
    assert_eq!(
        reference::row_capacity(100, 8, 256, 64).unwrap(),
        800 + 256 * 63
    );
    assert_eq!(reference::row_capacity(0, 8, 256, 64).unwrap(), 0);
    assert_eq!(reference::row_capacity(3, 8, 256, 1).unwrap(), 24);
    // Counts that do not fit i32 rows, or usize at all, are errors, not wrapped numbers.
    assert!(matches!(
        reference::row_capacity(1 << 28, 8, 256, 64),
        Err(Error::Limit { .. })
    ));
    assert!(reference::row_capacity(usize::MAX, 2, 4, 1).is_err());
    assert!(reference::row_capacity(usize::MAX / 2, 2, usize::MAX, 3).is_err());
    // Every expert of the token gets a full block; the GPU layout has exactly those rows.
    for (t, block) in [(1usize, 64usize), (3, 16), (31, 8)] {
        let c = RouterConfig {
            block_size: block,
            ..RouterConfig::deepseek_v3()
        };
        let p = logits_problem(c.clone(), t, true, false, DType::F32, 1400 + t as u64);
        let out = run(g, &p);
        let rows = reference::row_capacity(t, 8, 256, block).unwrap();
        assert_eq!(out.layout.sorted_slots.numel(), rows, "t={t} block={block}");
        assert_eq!(out.layout.block_experts.numel(), rows.div_ceil(block));
        assert_routing(&format!("t={t} block={block}"), &out, &p);
    }
}

/// The public references validate like the operators: sizes that overflow, routings for other
/// token counts and ids out of range are errors, never panics or wrapped sizes.
#[test]
fn references_refuse_what_the_operators_refuse() {
    let c = RouterConfig::deepseek_v3();
    // t·e overflows usize: an error, not a capacity-overflow panic.
    assert!(reference::route(&c, usize::MAX / 2, &[0.0; 256], None, None).is_err());
    assert!(reference::gate_logits(usize::MAX, 2, 256, &[], &[]).is_err());
    assert!(reference::gate_logits(1, usize::MAX, 256, &[], &[]).is_err());
    assert!(reference::combine(usize::MAX, 2, 1, &[], &[], &[]).is_err());
    assert!(reference::combine(2, 1, usize::MAX, &[0.5; 2], &[0, 1], &[]).is_err());
    // Dispatch: wrapped slot counts, a repeated expert, sizes the operator refuses.
    assert!(reference::dispatch(&[], usize::MAX, 2, 4, 1, 1).is_err());
    assert!(reference::dispatch(&[1, 1], 1, 2, 4, 1, 1).is_err());
    assert!(reference::dispatch(&[0, 1], 1, 2, 4, 1, 1 << 20).is_err());
    assert!(
        reference::dispatch(&[0, 1, 2], 1, 3, 2, 1, 1).is_err(),
        "k > e"
    );
    assert!(
        reference::dispatch(&[], 1 << 30, 4, 8, 1, 1).is_err(),
        "i32 rows"
    );
}
