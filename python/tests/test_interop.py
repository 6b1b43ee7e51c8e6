"""Inputs other than ndarrays: DLPack producers, __array__ objects, lists, and CPU torch tensors
when torch is installed."""

import numpy as np
import pytest

import fusedops

from conftest import assert_close


class DLPackOnly:
    """A producer with only the DLPack protocol (as a tensor library's array would be)."""

    def __init__(self, a):
        self._a = a

    def __dlpack__(self, **kwargs):
        return self._a.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()


class ArrayOnly:
    """A producer with only __array__."""

    def __init__(self, a):
        self._a = a

    def __array__(self, dtype=None, copy=None):
        return self._a if dtype is None else self._a.astype(dtype)


def swiftgmm_inputs(rng, dtype=np.float32):
    x = rng.standard_normal((9, 16)).astype(dtype)
    w = rng.standard_normal((2, 16, 8)).astype(dtype)
    return x, w, np.array([4, 5], np.int32)


@pytest.mark.parametrize("wrap", [DLPackOnly, ArrayOnly], ids=["dlpack", "array"])
def test_array_protocols(rng, wrap):
    x, w, counts = swiftgmm_inputs(rng)
    want = fusedops.swiftgmm(x, w, counts=counts)
    got = fusedops.swiftgmm(wrap(x), wrap(w), counts=wrap(counts))
    np.testing.assert_array_equal(got, want)


def test_nested_lists_need_an_explicit_dtype(rng):
    x, w, counts = swiftgmm_inputs(rng)
    # Python ints become int64: refused, with the conversion to use.
    with pytest.raises(fusedops.UnsupportedError, match="int64"):
        fusedops.swiftgmm(x, w, counts=[4, 5])


def test_torch_cpu_tensors(rng):
    torch = pytest.importorskip(
        "torch", reason="torch is not installed: the torch-tensor input test needs it (NumPy tests cover the rest)"
    )
    x, w, counts = swiftgmm_inputs(rng)
    want = fusedops.swiftgmm(x, w, counts=counts)
    got = fusedops.swiftgmm(torch.from_numpy(x), torch.from_numpy(w), counts=torch.from_numpy(counts))
    np.testing.assert_array_equal(got, want)
    # A transposed (non-contiguous) tensor is copied; bf16 tensors travel as their bits.
    wt = torch.from_numpy(np.ascontiguousarray(w.transpose(0, 2, 1))).transpose(1, 2)
    np.testing.assert_array_equal(fusedops.swiftgmm(torch.from_numpy(x), wt, counts=counts), want)
    xb, wb = torch.from_numpy(x).bfloat16(), torch.from_numpy(w).bfloat16()
    got_bf16 = fusedops.swiftgmm(xb, wb, counts=counts, out_dtype="f32")
    want_bf16 = (xb.float().numpy()[:, None, :] @ np.concatenate(
        [np.repeat(wb.float().numpy()[g][None], n, 0) for g, n in enumerate(counts)])).squeeze(1)
    assert_close(got_bf16, want_bf16, 1e-4, 1e-4, "bf16 torch inputs")
    # A tensor that requires grad is refused by torch's own export, as a fusedops error.
    with pytest.raises(fusedops.UnsupportedError):
        fusedops.swiftgmm(torch.from_numpy(x).requires_grad_(), w, counts=counts)
