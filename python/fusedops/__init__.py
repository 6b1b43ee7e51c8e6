"""fusedops: fused LLM-inference operators (AMLA, SwiftGMM, MerRouter, an MoE layer, per-token
int8 quantization) as WGSL compute shaders on any GPU through wgpu, on NumPy arrays, each with
its CPU reference under ``fusedops.reference``.

One GPU context per process, created on the first call that needs it; the GIL is released while
a kernel (or a reference) runs, and GPU work from several threads is serialised. Inputs are never
written: every result is a new array. See the project README ("Python") for dtypes and examples.
"""

from __future__ import annotations

import json
from typing import Any, Optional

import numpy as np

try:
    from . import _native
except ImportError as e:  # the source folder (python/fusedops) imported instead of the package
    raise ImportError(
        "fusedops._native is missing: install the package with `pip install ./python` and import "
        f"it from outside the python/ folder ({e})"
    ) from e

from . import _arrays, reference
from ._arrays import BFLOAT16, FLOAT8_E4M3FN, bf16_to_f32, f32_to_bf16
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
from ._ops import (
    AmlaOutput,
    ArrayLike,
    CacheFormat,
    DispatchLayout,
    MoeOutput,
    Operators,
    QuantizeOutput,
    RouterOutput,
)

__version__: str = _native.__version__

_gpu = Operators(_native.run)
amla = _gpu.amla
swiftgmm = _gpu.swiftgmm
route = _gpu.route
moe = _gpu.moe
quantize = _gpu.quantize


def quantize_cache(kv_cache: ArrayLike, kv_format: CacheFormat) -> np.ndarray:
    """AMLA's packed 8-bit cache from a float one, as FlashMLA's test quantizer makes it for FP8
    (docs/amla.md, "8-bit latent cache"). Runs on the CPU (the crate's
    ``amla::quantize_cache``); no GPU needed.

    Args:
        kv_cache: ``[num_blocks, page, 576]`` or ``[num_blocks, page, 1, 576]`` float32, float16
            or bfloat16.
        kv_format: ``"fp8"`` (E4M3 codes; per 128 values the power-of-two scale
            ``2^ceil(log2(max(amax / 448, 1e-4)))``) or ``"int8"`` (the symmetric scale
            ``max(amax / 127, 2^-126)``); codes rounded to nearest, ties to even. A group
            holding NaN or inf gets a NaN scale (the row then decodes to NaN).

    Returns:
        uint8 ``[num_blocks, page, 656]`` (or ``[num_blocks, page, 1, 656]``): per token 512
        codes, four little-endian f32 scales, 64 bf16 rope values. Pass it to ``amla`` with the
        same ``kv_format``; ``.view(fusedops.FLOAT8_E4M3FN)`` gives FlashMLA's dtype.
    """
    cache = _arrays.to_native("amla quantize_cache: kv_cache", kv_cache)
    return _arrays.from_native(_native.quantize_cache(cache, kv_format))


def operators() -> list[str]:
    """The operator names of the crate's registry (for ``bench(op=...)``)."""
    return list(_native.operator_names())


def info(probes: bool = False) -> dict[str, Any]:
    """What ``fusedops info --json`` prints, from the same function: ``environment`` (the adapter:
    name, backend, driver; its capabilities and limits; ``fusedops_version``, the crate's),
    ``coop_fragment`` (the cooperative-matrix size the kernels use, or None), ``paths`` (one
    ``{"op", "what", "choice"}`` dict per kernel choice of each operator on this adapter) and
    ``roofline`` (the probes with ``probes=True``, a few seconds; else None).

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
    "quantize",
    "quantize_cache",
    "reference",
    "info",
    "bench",
    "operators",
    "AmlaOutput",
    "RouterOutput",
    "DispatchLayout",
    "MoeOutput",
    "QuantizeOutput",
    "BFLOAT16",
    "FLOAT8_E4M3FN",
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
