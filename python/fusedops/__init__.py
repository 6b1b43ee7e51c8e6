"""fusedops: fused LLM-inference operators (AMLA, SwiftGMM, MerRouter, an MoE layer) as WGSL
compute shaders on any GPU through wgpu, on NumPy arrays, each with its CPU reference under
``fusedops.reference``.

One GPU context per process, created on the first call that needs it; the GIL is released while
a kernel (or a reference) runs, and GPU work from several threads is serialised. Inputs are never
written: every result is a new array. See the project README ("Python") for dtypes and examples.
"""

from __future__ import annotations

import json
from typing import Any, Optional

try:
    from . import _native
except ImportError as e:  # the source folder (python/fusedops) imported instead of the package
    raise ImportError(
        "fusedops._native is missing: install the package with `pip install ./python` and import "
        f"it from outside the python/ folder ({e})"
    ) from e

from . import reference
from ._arrays import BFLOAT16, bf16_to_f32, f32_to_bf16
from ._errors import (
    DeviceError,
    FormatError,
    FusedopsError,
    InvalidError,
    IoError,
    LimitError,
    NoAdapterError,
    ShapeError,
    UnsupportedError,
)
from ._ops import AmlaOutput, DispatchLayout, MoeOutput, Operators, RouterOutput

__version__: str = _native.__version__

_gpu = Operators(_native.run)
amla = _gpu.amla
swiftgmm = _gpu.swiftgmm
route = _gpu.route
moe = _gpu.moe


def operators() -> list[str]:
    """The operator names of the crate's registry (for ``bench(op=...)``)."""
    return list(_native.operator_names())


def info(probes: bool = False) -> dict[str, Any]:
    """The adapter (name, backend, driver), its capabilities and limits, the kernel path each
    operator takes on it (``paths``) and, with ``probes=True``, the roofline probes (a few seconds).
    The same content as ``fusedops info --json``; ``environment.fusedops_version`` is the crate's.

    Raises:
        NoAdapterError: no GPU adapter (the message has the install hint).
    """
    return json.loads(_native.info(bool(probes)))


def bench(
    op: Optional[str] = None,
    *,
    preset: Optional[str] = None,
    case: Optional[dict[str, Any]] = None,
    iters: int = 20,
    warmup: int = 3,
    scale: str = "bench",
) -> dict[str, Any]:
    """Verify, then time the registered cases (``fusedops bench``) and return the report as a
    dict: ``environment``, ``roofline`` and one entry per case in ``cases`` (check, GPU time,
    GB/s, TFLOP/s, roof percentage, speedup over the baseline).

    Args:
        op: one operator (``operators()``), default all.
        preset: only cases of this preset.
        case: only cases whose parameters have these values, e.g. ``{"tokens": 16}``.
        iters, warmup: timed and untimed iterations per case.
        scale: ``"bench"`` (benchmark shapes, shrunk on CPU adapters), ``"ci"`` (the small test
            shapes) or ``"full"``.
    """
    params = [(str(k), str(v)) for k, v in (case or {}).items()]
    return json.loads(_native.bench(op, preset, params, int(iters), int(warmup), str(scale)))


__all__ = [
    "__version__",
    "amla",
    "swiftgmm",
    "route",
    "moe",
    "reference",
    "info",
    "bench",
    "operators",
    "AmlaOutput",
    "RouterOutput",
    "DispatchLayout",
    "MoeOutput",
    "BFLOAT16",
    "bf16_to_f32",
    "f32_to_bf16",
    "FusedopsError",
    "NoAdapterError",
    "ShapeError",
    "InvalidError",
    "UnsupportedError",
    "LimitError",
    "DeviceError",
    "IoError",
    "FormatError",
]
