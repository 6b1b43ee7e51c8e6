"""Every operator on the GPU against its CPU reference, on small shapes (tolerances as in
docs/<op>.md and SPEC.md)."""

import numpy as np
import pytest

import fusedops
from fusedops import reference

from conftest import assert_close

BF16 = fusedops.BFLOAT16


def float_dtypes():
    return [np.float32, np.float16] + ([BF16] if BF16 is not None else [])


def amla_inputs(rng, dtype, s_q=1, h_q=4, seqlens=(20, 40), page=16):
    b = len(seqlens)
    max_blocks = max(-(-n // page) for n in seqlens) + 1
    num_blocks = b * max_blocks + 2
    # Pages shuffled over the cache; unused table entries -1, as vLLM pads them.
    pages = rng.permutation(num_blocks)
    table = np.full((b, max_blocks), -1, np.int32)
    for i, n in enumerate(seqlens):
        used = -(-n // page)
        table[i, :used] = pages[i * max_blocks:i * max_blocks + used]
    q = rng.standard_normal((b, s_q, h_q, 576)).astype(dtype)
    kv = rng.standard_normal((num_blocks, page, 576)).astype(dtype)
    return q, kv, table, np.array(seqlens, np.int32)


@pytest.mark.parametrize("dtype", float_dtypes(), ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(
    "params",
    [
        {},
        {"rescale": "multiply", "split": "off"},
        {"split": {"chunk": 16}, "p_precision": "f16"},
        {"softmax_scale": 0.03},
    ],
    ids=["default", "multiply-nosplit", "chunk16-p16", "scale"],
)
def test_amla_matches_reference(rng, dtype, params):
    q, kv, table, lens = amla_inputs(rng, dtype)
    out, lse = fusedops.amla(q, kv, table, lens, **params)
    want = reference.amla(q, kv, table, lens, **params)
    assert out.dtype == q.dtype and out.shape == (2, 1, 4, 512)
    assert lse.dtype == np.float32 and lse.shape == (2, 4, 1)
    # docs/amla.md: out abs 8e-4 or rel 2.01/128 (16-bit P or output), lse FlashMLA's bound.
    assert_close(out, want.out, 8e-4, 2.01 / 128, "out")
    assert_close(lse, want.lse, 1e-6, 8.01 / 65536, "lse")


def test_amla_causal_and_empty_rows(rng):
    # s_q = 2 causal; a sequence of length 0 sees no key: out 0, lse -inf.
    q, kv, table, lens = amla_inputs(rng, np.float32, s_q=2, seqlens=(1, 0, 37))
    got = fusedops.amla(q, kv, table, lens, causal=True)
    want = reference.amla(q, kv, table, lens, causal=True)
    assert np.isneginf(got.lse[1]).all() and not got.out[1].any()
    assert np.isneginf(got.lse[0, :, 0]).all()  # query 0 of a 1-key sequence sees nothing
    assert_close(got.out, want.out, 8e-4, 2.01 / 128, "out")
    assert_close(got.lse, want.lse, 1e-6, 8.01 / 65536, "lse")


SWIFTGMM_TOL = {"f32": (1e-4, 1e-4), "f16": (1e-3, 1e-3), "bf16": (1e-2, 8e-3)}


@pytest.mark.parametrize("dtype", float_dtypes(), ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("layout", ["kn", "nk"])
@pytest.mark.parametrize(
    "case",
    [
        {"counts": [5, 0, 19]},
        {"offsets": [2, 7, 7, 20]},  # rows 0-1 and 20-23 belong to no group: zero
        {"counts": [3, 9, 12], "activation": "swiglu", "row_scale": True},
        {"counts": [1, 1, 22], "mode": "gemm"},
        {"counts": [24, 0, 0], "mode": "gemv"},
    ],
    ids=["counts", "offsets-padding", "swiglu-rowscale", "gemm", "gemv"],
)
def test_swiftgmm_matches_reference(rng, dtype, layout, case):
    m, k, n, e = 24, 32, 16, 3
    x = (rng.standard_normal((m, k)) / np.sqrt(k)).astype(dtype)
    shape = (e, k, n) if layout == "kn" else (e, n, k)
    w = rng.standard_normal(shape).astype(dtype)
    kwargs = dict(case, layout=layout)
    for name in ("counts", "offsets"):
        if name in kwargs:
            kwargs[name] = np.array(kwargs[name], np.int32)
    if kwargs.pop("row_scale", False):
        kwargs["row_scale"] = rng.uniform(0.5, 2, m).astype(np.float32)
    out_dtype = "bf16" if np.dtype(dtype).name == "bfloat16" else np.dtype(dtype).name
    y = fusedops.swiftgmm(x, w, out_dtype=dtype, **kwargs)
    want = reference.swiftgmm(x, w, **kwargs)
    n_out = n // 2 if case.get("activation") == "swiglu" else n
    assert y.shape == (m, n_out) and y.dtype == np.dtype(dtype)
    assert want.dtype == np.float32
    name = {"float32": "f32", "float16": "f16"}.get(np.dtype(dtype).name, "bf16")
    assert_close(y, want, *SWIFTGMM_TOL[name], "y")
    if "offsets" in case:
        assert not y[:2].astype(np.float32).any() and not y[20:].astype(np.float32).any()


def check_routing(got, want):
    np.testing.assert_array_equal(got.topk_ids, want.topk_ids)
    assert_close(got.topk_weights, want.topk_weights, 1e-9, 1e-6, "topk_weights")
    for name in fusedops.DispatchLayout._fields:
        if name == "imbalance":
            assert_close(got.layout.imbalance, want.layout.imbalance, 0, 1e-6, name)
        else:
            np.testing.assert_array_equal(getattr(got.layout, name), getattr(want.layout, name), err_msg=name)


def test_route_pangu_with_router_scale(rng):
    logits = rng.standard_normal((7, 64)).astype(np.float32)
    scale = rng.uniform(0.5, 1.5, 64).astype(np.float32)
    got = fusedops.route(logits, router_scale=scale)
    want = reference.route(logits, router_scale=scale)
    assert got.topk_ids.shape == (7, 8) and got.topk_ids.dtype == np.int32
    # MoGE: one expert from each group of 8, listed group by group.
    np.testing.assert_array_equal(got.topk_ids // 8, np.tile(np.arange(8), (7, 1)))
    check_routing(got, want)
    assert got.out is None


def test_route_deepseek_with_bias_and_padding(rng):
    logits = rng.standard_normal((5, 256)).astype(np.float32)
    bias = (rng.standard_normal(256) * 0.1).astype(np.float32)
    got = fusedops.route(logits, bias=bias, preset="deepseek-v3", block_size=16)
    want = reference.route(logits, bias=bias, preset="deepseek-v3", block_size=16)
    # vLLM's bound: t*k slots plus block - 1 of padding for each of at most min(t*k, e) experts.
    assert got.layout.sorted_slots.shape == (5 * 8 + min(5 * 8, 256) * 15,)
    assert (got.layout.offsets % 16 == 0).all()
    check_routing(got, want)


def test_route_fused_gate_and_combine(rng):
    t, h, e = 6, 32, 20
    # Multiples of 1/8: the f32 gate products and sums are exact, so the GPU's logits equal the
    # f64 reference's and the weights keep the f32 tolerance.
    hidden = (rng.integers(-16, 17, (t, h)) / 8).astype(np.float32)
    gate = (rng.integers(-16, 17, (h, e)) / 8).astype(np.float32)
    config = dict(experts=e, groups=4, top_k=5, scoring="softmax", selection="group-limited",
                  k_group=2, group_score="max", renormalize=True)
    rows = t * 5
    y = rng.standard_normal((rows, 24)).astype(np.float32)
    got = fusedops.route(hidden, gate, y=y, **config)
    want = reference.route(hidden, gate, y=y, **config)
    check_routing(got, want)
    assert got.out.shape == (t, 24)
    assert_close(got.out, want.out, 1e-5, 1e-5, "out")


def moe_weights(rng, preset, dtype, t=6):
    h, i, e = 96, 48, {"pangu-pro-moe-small": 64, "deepseek-v3-small": 256}[preset]
    shared = {"pangu-pro-moe-small": 4 * 48, "deepseek-v3-small": 48}[preset]

    def w(*shape, fan_in):
        return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(dtype)

    args = dict(
        hidden=w(t, h, fan_in=1),
        gate_weight=w(h, e, fan_in=h),
        gate_up=w(e, 2 * i, h, fan_in=h),
        down=w(e, h, i, fan_in=i),
        shared_gate_up=w(1, 2 * shared, h, fan_in=h),
        shared_down=w(1, h, shared, fan_in=shared),
    )
    if preset.startswith("deepseek"):
        args["bias"] = (rng.standard_normal(e) * 0.01).astype(np.float32)
    else:
        args["router_scale"] = rng.uniform(0.5, 1.5, e).astype(np.float32)
    return args


@pytest.mark.parametrize(
    "preset,dtype",
    [("pangu-pro-moe-small", np.float32), ("deepseek-v3-small", np.float32)]
    + ([("pangu-pro-moe-small", BF16)] if BF16 is not None else []),
    ids=lambda v: v if isinstance(v, str) else np.dtype(v).name,
)
def test_moe_matches_reference(rng, preset, dtype):
    args = moe_weights(rng, preset, dtype)
    hidden, gate, gate_up, down = (args.pop(k) for k in ("hidden", "gate_weight", "gate_up", "down"))
    got = fusedops.moe(hidden, gate, gate_up, down, preset=preset, **args)
    want = reference.moe(hidden, gate, gate_up, down, preset=preset, **args)
    assert got.out.shape == hidden.shape and got.out.dtype == hidden.dtype
    np.testing.assert_array_equal(got.topk_ids, want.topk_ids)
    assert_close(got.topk_weights, want.topk_weights, 1e-9, 1e-6, "topk_weights")
    # docs/moe.md: f32 1e-4 abs-or-rel; bf16 1/64 abs or 1/128 rel.
    tol = (1e-4, 1e-4) if np.dtype(dtype) == np.float32 else (1 / 64, 1 / 128)
    assert_close(got.out, want.out, *tol, "out")


def test_moe_without_shared_expert_and_out_dtype(rng):
    args = moe_weights(rng, "pangu-pro-moe-small", np.float32)
    del args["shared_gate_up"], args["shared_down"]
    got = fusedops.moe(**args, preset="pangu-pro-moe-small", out_dtype="f16")
    want = reference.moe(**args, preset="pangu-pro-moe-small", out_dtype="f16")
    assert got.out.dtype == np.float16 and want.out.dtype == np.float16
    assert_close(got.out, want.out, 1 / 512, 1 / 512, "out")
