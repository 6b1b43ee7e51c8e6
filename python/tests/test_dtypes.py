"""Dtype round trips: a grouped matmul by the identity returns x exactly, in x's dtype, so every
float dtype goes in and comes back bit for bit; bf16 both as ml_dtypes.bfloat16 and as uint16 bit
patterns."""

import numpy as np
import pytest

import fusedops
from fusedops import _arrays

M, K = 7, 16


def values(rng):
    # Finite values across the range of f16 (no -0: 0 * x sums make it +0).
    v = rng.standard_normal((M, K)) * np.logspace(-3, 4, K)
    return np.where(v == 0, 1.0, v)


def identity_gmm(x, out_dtype):
    eye = np.eye(K, dtype=np.float32)[None]
    w = fusedops.f32_to_bf16(eye) if x.dtype == np.uint16 else eye.astype(x.dtype)
    return fusedops.swiftgmm(x, w, counts=np.array([M], np.int32), out_dtype=out_dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
def test_float_round_trip(rng, dtype):
    x = values(rng).astype(dtype)
    y = identity_gmm(x, dtype)
    assert y.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(y.view(np.uint8), x.view(np.uint8))
    assert y.flags.writeable and y.flags.c_contiguous and y.flags.owndata is False


def test_bf16_round_trip_with_ml_dtypes(rng):
    if fusedops.BFLOAT16 is None:
        pytest.fail("ml_dtypes is a test dependency (pip install ml_dtypes): bf16 tests need it")
    x = values(rng).astype(fusedops.BFLOAT16)
    y = identity_gmm(x, "bf16")
    assert y.dtype == fusedops.BFLOAT16
    np.testing.assert_array_equal(y.view(np.uint16), x.view(np.uint16))
    # bf16 -> f32 through the identity: exact widening.
    np.testing.assert_array_equal(identity_gmm(x, np.float32), x.astype(np.float32))


def test_bf16_as_uint16_bits_without_ml_dtypes(rng, monkeypatch):
    # What a machine without ml_dtypes sees: bf16 outputs as uint16 bit patterns.
    monkeypatch.setattr(_arrays, "BFLOAT16", None)
    bits = fusedops.f32_to_bf16(values(rng).astype(np.float32))
    assert bits.dtype == np.uint16
    y = identity_gmm(bits, "bf16")
    assert y.dtype == np.uint16
    np.testing.assert_array_equal(y, bits)
    np.testing.assert_array_equal(identity_gmm(bits, "f32"), fusedops.bf16_to_f32(bits))


def test_bf16_helpers_round_to_nearest_even():
    x = np.array([1.0, 1.00390625, 1.005859375, -2.5, 3.0e38, np.inf, -np.inf, 1e-40], np.float32)
    bits = fusedops.f32_to_bf16(x)
    np.testing.assert_array_equal(
        bits, np.array([0x3F80, 0x3F80, 0x3F81, 0xC020, 0x7F62, 0x7F80, 0xFF80, 0x0001], np.uint16)
    )
    assert np.isnan(fusedops.bf16_to_f32(fusedops.f32_to_bf16(np.array([np.nan], np.float32))))
    if fusedops.BFLOAT16 is not None:
        r = np.random.default_rng(3).standard_normal(1000).astype(np.float32)
        np.testing.assert_array_equal(fusedops.f32_to_bf16(r), r.astype(fusedops.BFLOAT16).view(np.uint16))


def test_integer_inputs_i32_and_u32(rng):
    x = values(rng).astype(np.float32)
    w = rng.standard_normal((2, K, 5)).astype(np.float32)
    a = fusedops.swiftgmm(x, w, counts=np.array([3, 4], np.int32))
    b = fusedops.swiftgmm(x, w, counts=np.array([3, 4], np.uint32))
    c = fusedops.swiftgmm(x, w, offsets=np.array([0, 3, 7], np.uint32))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


def test_output_dtype_names():
    names = {"f32": "f32", np.float32: "f32", "float16": "f16", np.dtype(np.float16): "f16",
             "bfloat16": "bf16", "BF16": "bf16", "int32": "i32", np.uint32: "u32"}
    for given, want in names.items():
        assert _arrays.dtype_name(given) == want
    for bad in ["f64", np.float64, np.uint16, "nonsense", object]:
        with pytest.raises(fusedops.UnsupportedError):
            _arrays.dtype_name(bad)
