"""The quantized variants from Python: int8/uint8 arrays, quantize, W8A16 and W8A8 swiftgmm, the
W8A8 MoE presets, AMLA's packed 8-bit caches (quantize_cache), each on the GPU against its CPU
reference, and the parameter values the package spells against the crate's refusals."""

import typing

import numpy as np
import pytest

import fusedops
from fusedops import _ops, reference

from conftest import assert_close
from test_ops import amla_inputs, moe_weights


def int8_weights(rng, *shape):
    return rng.integers(-127, 128, size=shape, dtype=np.int8)


def test_int8_and_uint8_dtypes_round_trip_by_name():
    assert fusedops._arrays.dtype_name("int8") == "i8"
    assert fusedops._arrays.dtype_name(np.uint8) == "u8"
    with pytest.raises(fusedops.UnsupportedError):
        fusedops._arrays.dtype_name("int4")


def test_quantize_is_bit_exact_with_the_reference(rng):
    x = (rng.standard_normal((7, 64)) * 3).astype(np.float32)
    x[1] = 0  # a zero row: scale 0, codes 0
    x[2, 5] = np.nan  # a row with NaN: scale NaN, codes 0
    x[3, :] = 0.5 * np.arange(64) - 16  # ties: 127 * v / 16 lands on halves for some v
    got = fusedops.quantize(x)
    want = reference.quantize(x)
    assert got.q.dtype == np.int8 and got.q.shape == (7, 64)
    assert got.scale.dtype == np.float32 and got.scale.shape == (7,)
    np.testing.assert_array_equal(got.q, want.q)
    np.testing.assert_array_equal(got.scale, want.scale)  # NaN positions compare equal too
    assert got.scale[1] == 0 and not got.q[1].any()
    assert np.isnan(got.scale[2]) and not got.q[2].any()
    assert np.abs(got.q).max() <= 127
    finite = np.isfinite(got.scale)
    np.testing.assert_allclose(got.q[finite] * got.scale[finite, None], x[finite], atol=0.02 * 3 * 4)


def test_quantize_refuses_k_not_a_multiple_of_4(rng):
    with pytest.raises(fusedops.UnsupportedError, match="multiple of 4"):
        fusedops.quantize(rng.standard_normal((2, 6)).astype(np.float32))


@pytest.mark.parametrize("layout", ["kn", "nk"])
@pytest.mark.parametrize("offset", [False, True], ids=["scale", "scale+offset"])
@pytest.mark.parametrize("kernel", ["auto", "simt"])
def test_w8a16_swiftgmm_matches_reference(rng, layout, offset, kernel):
    e, k, n, counts = 3, 64, 32, np.array([1, 0, 21], np.int32)
    m = int(counts.sum())
    x = rng.standard_normal((m, k)).astype(np.float16)
    w = int8_weights(rng, e, k, n) if layout == "kn" else int8_weights(rng, e, n, k)
    w_scale = rng.uniform(0.001, 0.01, (e, n)).astype(np.float32)
    extra = {"w_offset": rng.uniform(-2, 2, (e, n)).astype(np.float32)} if offset else {}
    got = fusedops.swiftgmm(x, w, counts=counts, w_scale=w_scale, layout=layout,
                            gemm_kernel=kernel, **extra)
    want = reference.swiftgmm(x, w, counts=counts, w_scale=w_scale, layout=layout, **extra)
    assert got.shape == (m, n) and got.dtype == np.float32
    # f16 x times exact integer codes, f32 accumulation (f16 staging of q + offset on
    # cooperative matrices rounds the offset): relative to the output's scale.
    scale = np.abs(want).max()
    assert_close(got, want, 2e-3 * scale, 1e-3, "y")


def test_w8a8_swiftgmm_is_exact_int32_sums(rng):
    e, k, n, counts = 2, 128, 48, np.array([9, 4], np.int32)
    m = int(counts.sum())
    xq = fusedops.quantize(rng.standard_normal((m, k)).astype(np.float32))
    w = int8_weights(rng, e, n, k)
    w_scale = rng.uniform(0.001, 0.01, (e, n)).astype(np.float32)
    got = fusedops.swiftgmm(xq.q, w, counts=counts, x_scale=xq.scale, w_scale=w_scale, layout="nk")
    want = reference.swiftgmm(xq.q, w, counts=counts, x_scale=xq.scale, w_scale=w_scale, layout="nk")
    # The i32 sum is exact on both sides, rounded once to f32 and scaled by the same factors.
    assert_close(got, want, 1e-30, 4e-7, "y")
    # And it is what NumPy's integer matmul gives.
    start = 0
    for g, c in enumerate(counts):
        sums = xq.q[start:start + c].astype(np.int64) @ w[g].astype(np.int64).T
        np.testing.assert_allclose(got[start:start + c],
                                   sums * xq.scale[start:start + c, None] * w_scale[g][None, :],
                                   rtol=1e-6)
        start += c


def test_w8a8_refuses_the_coop_kernel_and_missing_scales(rng):
    xq = fusedops.quantize(rng.standard_normal((4, 64)).astype(np.float32))
    w = int8_weights(rng, 1, 64, 16)
    w_scale = np.ones((1, 16), np.float32)
    with pytest.raises(fusedops.FusedopsError):
        fusedops.swiftgmm(xq.q, w, counts=np.array([4], np.int32), x_scale=xq.scale, w_scale=w_scale, gemm_kernel="coop")
    with pytest.raises(fusedops.FusedopsError):
        fusedops.swiftgmm(xq.q, w, counts=np.array([4], np.int32), w_scale=w_scale)  # no x_scale
    with pytest.raises(fusedops.FusedopsError):
        fusedops.swiftgmm(rng.standard_normal((4, 64)).astype(np.float32), w, counts=np.array([4], np.int32))
    # Scales meant for int8 weights, given with float ones: the error says what they belong to.
    wf = rng.standard_normal((1, 64, 16)).astype(np.float32)
    with pytest.raises(fusedops.InvalidError, match="w_offset belongs to int8 weights"):
        fusedops.swiftgmm(rng.standard_normal((4, 64)).astype(np.float32), wf,
                          counts=np.array([4], np.int32), w_offset=np.zeros((1, 16), np.float32))
    with pytest.raises(fusedops.InvalidError, match="x_scale belongs to int8 weights"):
        fusedops.swiftgmm(xq.q, wf, counts=np.array([4], np.int32), x_scale=xq.scale)


def quantize_weights(rng, w):
    """Per-output-channel symmetric int8 of [e, n, k] float weights (nk layout)."""
    amax = np.abs(w).max(axis=2)
    scale = np.where(amax > 0, amax / 127, 1).astype(np.float32)
    q = np.clip(np.rint(w / scale[:, :, None]), -127, 127).astype(np.int8)
    return q, scale


def test_w8a8_moe_matches_reference(rng):
    args = moe_weights(rng, "pangu-pro-moe-small", np.float32)
    for name in ("gate_up", "down", "shared_gate_up", "shared_down"):
        args[name], args[name + "_scale"] = quantize_weights(rng, args[name])
    got = fusedops.moe(**args, preset="pangu-pro-moe-small-w8a8")
    want = reference.moe(**args, preset="pangu-pro-moe-small-w8a8")
    np.testing.assert_array_equal(got.topk_ids, want.topk_ids)
    assert_close(got.out, want.out, 1e-4, 1e-4, "out")
    # A float weight under a W8A8 preset is refused.
    args["down"] = args["down"].astype(np.float32)
    with pytest.raises(fusedops.FusedopsError):
        fusedops.moe(**args, preset="pangu-pro-moe-small-w8a8")


@pytest.mark.parametrize("kv_format", ["fp8", "int8"])
def test_amla_8bit_cache_matches_reference(rng, kv_format):
    q, kv, table, lens = amla_inputs(rng, np.float32)
    q = q.astype(fusedops.BFLOAT16) if fusedops.BFLOAT16 is not None else q
    packed = fusedops.quantize_cache(kv, kv_format)
    assert packed.dtype == np.uint8 and packed.shape == kv.shape[:2] + (656,)
    out, lse = fusedops.amla(q, packed, table, lens, kv_format=kv_format)
    want = reference.amla(q, packed, table, lens, kv_format=kv_format)
    assert_close(out, want.out, 8e-4, 2.01 / 128, "out")
    assert_close(lse, want.lse, 1e-6, 8.01 / 65536, "lse")
    # The 8-bit cache approximates the float one it came from.
    full = reference.amla(q, kv, table, lens)
    err = np.abs(want.out.astype(np.float64) - full.out.astype(np.float64)).max()
    assert err < 0.1 * np.abs(full.out.astype(np.float64)).max()


def test_amla_fp8_cache_as_flashmla_holds_it(rng):
    if fusedops.FLOAT8_E4M3FN is None:
        pytest.skip("ml_dtypes is not installed (the CI installs it)")
    q, kv, table, lens = amla_inputs(rng, np.float32)
    packed = fusedops.quantize_cache(kv[:, :, None, :], "fp8")  # FlashMLA's 4-D layout
    assert packed.shape == kv.shape[:2] + (1, 656)
    as_fp8 = packed.view(fusedops.FLOAT8_E4M3FN)
    got = fusedops.amla(q, as_fp8, table, lens, kv_format="fp8")
    want = fusedops.amla(q, packed, table, lens, kv_format="fp8")
    np.testing.assert_array_equal(got.out, want.out)


def test_amla_8bit_cache_needs_its_format(rng):
    q, kv, table, lens = amla_inputs(rng, np.float32)
    packed = fusedops.quantize_cache(kv, "int8")
    with pytest.raises(fusedops.FusedopsError):
        fusedops.amla(q, packed, table, lens)  # a uint8 cache without kv_format
    with pytest.raises(fusedops.FusedopsError):
        fusedops.amla(q, kv, table, lens, kv_format="int8")  # a float cache called int8
    with pytest.raises(fusedops.FusedopsError):
        fusedops.quantize_cache(kv, "int4")


def literal_values(alias):
    return list(typing.get_args(alias))


@pytest.mark.parametrize(
    "op,param,alias",
    [
        ("amla", "rescale", _ops.Rescale),
        ("amla", "p_precision", _ops.PPrecision),
        ("amla", "kv_format", _ops.KvFormat),
        ("swiftgmm", "layout", _ops.Layout),
        ("swiftgmm", "activation", _ops.Activation),
        ("swiftgmm", "mode", _ops.Mode),
        ("swiftgmm", "gemm_kernel", _ops.GemmKernel),
        ("merrouter", "preset", _ops.RouterPreset),
        ("moe", "preset", _ops.MoePreset),
    ],
)
def test_spelled_parameter_values_are_the_crates(op, param, alias):
    """Every value the package's Literal types spell is one the crate's parser accepts (no
    format error naming the parameter), and a value outside them is refused naming it."""

    def parse_error(value):
        try:
            fusedops._native.reference(op, {}, '{"%s": "%s"}' % (param, value))
        except fusedops.FusedopsError as e:
            text = str(e)
            # A missing tensor is fine: the parameters parsed.
            return text if param in text and "unknown" in text else None
        return None

    for value in literal_values(alias):
        assert parse_error(value) is None, f"{op}.{param}={value!r}: {parse_error(value)}"
    assert parse_error("no-such-value") is not None
