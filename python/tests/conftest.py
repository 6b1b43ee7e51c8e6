"""Shared helpers. Every GPU test needs an adapter: without one the first call raises
fusedops.NoAdapterError with the install hint and the test fails (never skips)."""

import numpy as np
import pytest


def assert_close(got, want, abs_tol, rel_tol, what="output"):
    """Abs-or-rel per element, as the crate's check::compare: |got - want| <= max(abs, rel *
    |want|); NaN and infinity positions must agree exactly."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    finite = np.isfinite(want)
    assert np.array_equal(np.isfinite(got), finite), f"{what}: NaN/inf positions differ"
    assert np.array_equal(got[~finite], want[~finite], equal_nan=True), f"{what}: non-finite values differ"
    err = np.abs(got[finite] - want[finite])
    allowed = np.maximum(abs_tol, rel_tol * np.abs(want[finite]))
    bad = err > allowed
    if bad.any():
        i = int(np.argmax(err - allowed))
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {err.size} elements out of tolerance; worst "
            f"got {got[finite][i]!r} want {want[finite][i]!r} (abs {abs_tol}, rel {rel_tol})"
        )


@pytest.fixture
def rng():
    return np.random.default_rng(20251201)
