"""The operators, written once for both backends: ``fusedops.amla`` etc. run the GPU kernels
(``_native.run``) and ``fusedops.reference.amla`` etc. the crate's CPU references
(``_native.reference``), with the same arguments and result types.

Each call goes through the crate's operator registry with the tensor names and JSON parameters of
``fusedops run`` (README, "fusedops run tensors"): the crate validates everything and its defaults
apply to every parameter left as ``None``. Keyword names are the JSON field names and tensor
names; the ``Literal`` types below spell the values the crate accepts, and
``tests/test_params.py`` checks both against the crate's own refusals.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Literal, NamedTuple, Optional, Union

import numpy as np

from . import _arrays
from ._errors import InvalidError

ArrayLike = Any
"""An ndarray, or anything with ``__dlpack__`` / ``__array__`` (e.g. a CPU torch tensor)."""

DTypeLike = Union[str, type, np.dtype]
"""``"f32"``, ``"f16"``, ``"bf16"``, ``np.float32``, ``ml_dtypes.bfloat16``, ..."""

Native = Callable[[str, dict, str], dict]

# The values of the crate's parameters (docs/<op>.md, "fusedops run").
Rescale = Literal["amla", "multiply"]
PPrecision = Literal["f32", "f16", "bf16", "cache"]
KvFormat = Literal["float", "fp8", "int8"]
CacheFormat = Literal["fp8", "int8"]
"""The 8-bit formats of ``KvFormat`` (what ``quantize_cache`` makes)."""
SplitWord = Literal["auto", "off"]
Layout = Literal["kn", "nk"]
Activation = Literal["none", "swiglu"]
Mode = Literal["auto", "gemv", "gemm"]
TilingWord = Literal["cached", "tune", "defaults"]
GemmKernel = Literal["auto", "simt", "coop"]
RouterPreset = Literal["pangu-pro-moe", "deepseek-v3"]
Scoring = Literal["softmax", "sigmoid"]
Selection = Literal["moge", "group-limited"]
GroupScore = Literal["max", "sum-top2"]
MoePreset = Literal[
    "pangu-pro-moe",
    "deepseek-v3",
    "pangu-pro-moe-small",
    "deepseek-v3-small",
    "pangu-pro-moe-w8a8",
    "deepseek-v3-w8a8",
    "pangu-pro-moe-small-w8a8",
    "deepseek-v3-small-w8a8",
]


class AmlaOutput(NamedTuple):
    """``out [b, s_q, h_q, 512]`` and ``lse [b, h_q, s_q]`` (float32, natural log; -inf for a row
    that sees no key)."""

    out: np.ndarray
    lse: np.ndarray


class DispatchLayout(NamedTuple):
    """The dispatch layout of the routed slots (docs/merrouter.md), every array int32 except
    ``imbalance``."""

    counts: np.ndarray
    """``[e]`` slots routed to each expert."""
    offsets: np.ndarray
    """``[e + 1]`` exclusive prefix of the padded counts: SwiftGMM's group offsets."""
    sorted_slots: np.ndarray
    """``[rows]`` the slot (token * k + j) at each row, expert by expert; padding holds t * k."""
    slot_rows: np.ndarray
    """``[t, k]`` the row of every slot."""
    block_experts: np.ndarray
    """``[ceil(rows / block_size)]`` the expert of each block; -1 past ``offsets[e]``."""
    group_loads: np.ndarray
    """``[g]`` slots routed to each group of experts."""
    imbalance: np.ndarray
    """``[1]`` float32: (max - min group load) / t."""


class RouterOutput(NamedTuple):
    """What ``route`` returns."""

    topk_ids: np.ndarray
    """``[t, k]`` int32 expert ids, in selection order."""
    topk_weights: np.ndarray
    """``[t, k]`` float32 routing weights."""
    layout: DispatchLayout
    out: Optional[np.ndarray]
    """The combine of ``y`` (``[t, n]`` in y's dtype) when ``y`` was given, else None."""


class QuantizeOutput(NamedTuple):
    """What ``quantize`` returns: ``x ~= q * scale[:, None]``."""

    q: np.ndarray
    """``[m, k]`` int8, in -127..=127."""
    scale: np.ndarray
    """``[m]`` float32: max |row| / 127; 0 for a zero row, NaN for a row holding NaN or inf."""


class MoeOutput(NamedTuple):
    """What ``moe`` returns."""

    out: np.ndarray
    """``[t, h]`` in ``out_dtype`` (default: hidden's dtype)."""
    topk_ids: np.ndarray
    topk_weights: np.ndarray


def _json_value(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not a parameter value")


def call(native: Native, op: str, inputs: dict[str, Any], params: dict[str, Any]) -> dict[str, np.ndarray]:
    """Run ``op`` through ``native`` on the inputs that are not None, with the parameters that
    are not None."""
    tensors = {name: _arrays.to_native(f"{op}: {name}", x) for name, x in inputs.items() if x is not None}
    given = {key: value for key, value in params.items() if value is not None}
    try:
        text = json.dumps(given, allow_nan=False, default=_json_value)
    except (TypeError, ValueError) as e:
        raise InvalidError(f"{op}: invalid parameters {given!r}: {e}") from None
    outputs = native(op, tensors, text)
    return {name: _arrays.from_native(item) for name, item in outputs.items()}


class Operators:
    """The operators on one backend (GPU kernels or CPU references)."""

    def __init__(self, native: Native) -> None:
        self._native = native

    def amla(
        self,
        q: ArrayLike,
        kv_cache: ArrayLike,
        block_table: ArrayLike,
        cache_seqlens: ArrayLike,
        *,
        softmax_scale: Optional[float] = None,
        causal: Optional[bool] = None,
        rescale: Optional[Rescale] = None,
        p_precision: Optional[PPrecision] = None,
        split: Union[SplitWord, dict, None] = None,
        kv_format: Optional[KvFormat] = None,
    ) -> AmlaOutput:
        """MLA decode attention over a paged latent KV cache (docs/amla.md).

        Args:
            q: ``[b, s_q, h_q, 576]`` float32, float16 or bfloat16 (512 latent + 64 rope dims).
            kv_cache: ``[num_blocks, page, 576]`` or FlashMLA's ``[num_blocks, page, 1, 576]``,
                float32, float16 or bfloat16; V is the first 512 columns. ``page`` is a power of
                two >= 16. Or the packed 8-bit cache (``kv_format`` ``"fp8"`` or ``"int8"``):
                ``[num_blocks, page, 656]`` / ``[num_blocks, page, 1, 656]`` uint8 (or
                ``ml_dtypes.float8_e4m3fn``, as FlashMLA holds it): per token 512 codes, four f32
                scales, 64 bf16 rope values (``quantize_cache`` makes one).
            block_table: ``[b, max_blocks]`` int32 page ids of each sequence (unused entries may
                hold anything, e.g. -1).
            cache_seqlens: ``[b]`` int32 keys in each sequence.
            softmax_scale: scale of q.k (default 1/sqrt(576)).
            causal: with s_q > 1, query i of a sequence of length L sees keys 0..=L-s_q+i
                (default False).
            rescale: ``"amla"`` (default: the output rescaled by an integer add on its exponent)
                or ``"multiply"``.
            p_precision: ``"f32"`` (default); ``"f16"`` or ``"bf16"`` (P rounded to that type
                before P.V); ``"cache"`` (16 bits in the cache's type: bf16 for a bf16 or 8-bit
                cache, f16 for an f16 or f32 cache).
            split: ``"auto"`` (default), ``"off"``, ``{"chunk": keys}`` or
                ``{"target_workgroups": n}``.
            kv_format: ``"float"`` (default: a float cache), ``"fp8"`` (FP8 E4M3 codes) or
                ``"int8"`` (int8 codes) for a packed uint8 cache.

        Returns:
            ``(out, lse)``: the GPU's ``out`` is in q's dtype; the reference's is the exact f64
            result as float32. ``lse`` is float32.
        """
        got = call(
            self._native,
            "amla",
            {"q": q, "kv_cache": kv_cache, "block_table": block_table, "cache_seqlens": cache_seqlens},
            {"softmax_scale": softmax_scale, "causal": causal, "rescale": rescale,
             "p_precision": p_precision, "split": split, "kv_format": kv_format},
        )
        return AmlaOutput(got["out"], got["lse"])

    def swiftgmm(
        self,
        x: ArrayLike,
        w: ArrayLike,
        offsets: Optional[ArrayLike] = None,
        counts: Optional[ArrayLike] = None,
        *,
        row_scale: Optional[ArrayLike] = None,
        x_scale: Optional[ArrayLike] = None,
        w_scale: Optional[ArrayLike] = None,
        w_offset: Optional[ArrayLike] = None,
        layout: Optional[Layout] = None,
        activation: Optional[Activation] = None,
        out_dtype: Optional[DTypeLike] = None,
        mode: Optional[Mode] = None,
        tiling: Union[TilingWord, dict, None] = None,
        gemm_kernel: Optional[GemmKernel] = None,
    ) -> np.ndarray:
        """Grouped matmul for MoE experts: ``y[rows of g] = epilogue(x[rows of g] @ W_g)``
        (docs/swiftgmm.md), with float or int8 weights.

        The format follows from the dtypes: float ``x`` and ``w`` (16-bit path); float ``x``
        with int8 ``w`` and ``w_scale`` (W8A16); int8 ``x`` with ``x_scale`` and int8 ``w`` with
        ``w_scale`` (W8A8, exact int32 sums; ``quantize`` makes such an ``x``).

        Args:
            x: ``[m_total, k]`` float32, float16 or bfloat16, or int8 (W8A8), rows sorted by
                group.
            w: ``[e, k, n]`` (layout ``"kn"``, default) or ``[e, n, k]`` (``"nk"``, PyTorch
                Linear), float32, float16 or bfloat16, or int8 (with ``w_scale``). int8 rows hold
                whole 32-bit words: the contiguous dimension (and k for W8A8) a multiple of 4.
            offsets: ``[e + 1]`` int32/uint32: group g is rows ``offsets[g]:offsets[g+1]``.
            counts: ``[e]`` int32/uint32 rows per group from row 0. Give exactly one of the two.
            row_scale: ``[m_total]`` float32, multiplies each output row.
            x_scale: ``[m_total]`` float32 per-row scale of an int8 ``x`` (W8A8).
            w_scale: ``[e, n]`` float32 per-output-channel scale of int8 ``w``.
            w_offset: ``[e, n]`` float32 offset added to int8 ``w`` before the scale (W8A16
                only): ``y = w_scale * sum x * (q + w_offset)``.
            activation: ``"none"`` (default) or ``"swiglu"`` (``n = 2i``; output ``[m_total, i]``,
                ``silu(gate) * up`` with gate the first i columns).
            out_dtype: output dtype (default float32). The reference always returns float32.
            mode: ``"auto"`` (default: GEMV or GEMM per group from its rows), ``"gemv"``,
                ``"gemm"``.
            tiling: ``"cached"`` (default), ``"tune"`` (16-bit only), ``"defaults"`` or
                ``{"fixed": {...}}``.
            gemm_kernel: the GEMM path's kernel: ``"auto"`` (default: cooperative matrices where
                the adapter has them), ``"simt"``, or ``"coop"`` (an error without them, and for
                W8A8).

        Returns:
            ``y [m_total, n_out]``; rows outside every group are zero.
        """
        got = call(
            self._native,
            "swiftgmm",
            {"x": x, "w": w, "offsets": offsets, "counts": counts, "row_scale": row_scale,
             "x_scale": x_scale, "w_scale": w_scale, "w_offset": w_offset},
            {"layout": layout, "activation": activation,
             "out_dtype": None if out_dtype is None else _arrays.dtype_name(out_dtype),
             "mode": mode, "tiling": tiling, "gemm_kernel": gemm_kernel},
        )
        return got["y"]

    def route(
        self,
        logits_or_hidden: ArrayLike,
        gate_weight: Optional[ArrayLike] = None,
        *,
        bias: Optional[ArrayLike] = None,
        router_scale: Optional[ArrayLike] = None,
        y: Optional[ArrayLike] = None,
        preset: Optional[RouterPreset] = None,
        experts: Optional[int] = None,
        groups: Optional[int] = None,
        top_k: Optional[int] = None,
        scoring: Optional[Scoring] = None,
        selection: Optional[Selection] = None,
        k_group: Optional[int] = None,
        group_score: Optional[GroupScore] = None,
        renormalize: Optional[bool] = None,
        routed_scaling_factor: Optional[float] = None,
        block_size: Optional[int] = None,
    ) -> RouterOutput:
        """MoE routing (MerRouter): scores, top-k, weights and the dispatch layout
        (docs/merrouter.md).

        Args:
            logits_or_hidden: ``logits [t, e]``, or ``hidden [t, h]`` when ``gate_weight`` is
                given (the fused gate: logits = hidden @ gate_weight); float32/float16/bfloat16.
            gate_weight: ``[h, e]``.
            bias: ``[e]`` float32, chooses only (DeepSeek-V3's correction bias).
            router_scale: ``[e]`` float32 per-expert weight scale (Pangu Pro MoE).
            y: ``[rows, n]`` expert outputs in dispatch-row order: also run the combine
                ``out[t] = sum_j topk_weights[t, j] * y[slot_rows[t, j]]``.
            preset: the routing to start from (default ``"pangu-pro-moe"``); every other keyword
                overrides one field of it (experts, groups, top_k, scoring, selection, k_group,
                group_score, renormalize, routed_scaling_factor, block_size).

        Returns:
            ``RouterOutput(topk_ids, topk_weights, layout, out)``.
        """
        scores = {"hidden": logits_or_hidden} if gate_weight is not None else {"logits": logits_or_hidden}
        got = call(
            self._native,
            "merrouter",
            {**scores, "gate_weight": gate_weight, "bias": bias, "router_scale": router_scale, "y": y},
            {"preset": preset, "experts": experts, "groups": groups, "top_k": top_k,
             "scoring": scoring, "selection": selection, "k_group": k_group,
             "group_score": group_score, "renormalize": renormalize,
             "routed_scaling_factor": routed_scaling_factor, "block_size": block_size},
        )
        layout = DispatchLayout(**{name: got[name] for name in DispatchLayout._fields})
        return RouterOutput(got["topk_ids"], got["topk_weights"], layout, got.get("out"))

    def moe(
        self,
        hidden: ArrayLike,
        gate_weight: ArrayLike,
        gate_up: ArrayLike,
        down: ArrayLike,
        *,
        bias: Optional[ArrayLike] = None,
        router_scale: Optional[ArrayLike] = None,
        shared_gate_up: Optional[ArrayLike] = None,
        shared_down: Optional[ArrayLike] = None,
        gate_up_scale: Optional[ArrayLike] = None,
        down_scale: Optional[ArrayLike] = None,
        shared_gate_up_scale: Optional[ArrayLike] = None,
        shared_down_scale: Optional[ArrayLike] = None,
        preset: Optional[MoePreset] = None,
        router: Optional[dict] = None,
        layout: Optional[Layout] = None,
        out_dtype: Optional[DTypeLike] = None,
        mode: Optional[Mode] = None,
        tiling: Union[TilingWord, dict, None] = None,
    ) -> MoeOutput:
        """A whole MoE layer: router, grouped SwiGLU expert MLPs, optional shared expert,
        combine (docs/moe.md). The sizes h, i and the shared intermediate come from the tensors.

        W8A8 (int8 expert weights, activations quantized per token in the gather and after
        SwiGLU): give the four expert weights as int8, each with its ``<name>_scale``.

        Args:
            hidden: ``[t, h]`` float32/float16/bfloat16 (the activation dtype).
            gate_weight: ``[h, e]`` router weight (in the activation dtypes, also with W8A8).
            gate_up: ``[e, 2i, h]`` (layout ``"nk"``, default) or ``[e, h, 2i]`` (``"kn"``); gate
                = first i columns, up = last i. Float, or int8 with ``gate_up_scale``.
            down: ``[e, h, i]`` (nk) or ``[e, i, h]`` (kn).
            bias, router_scale: ``[e]`` float32 (or 16-bit), as in ``route``.
            shared_gate_up, shared_down: the shared expert ``[1, 2is, h]``, ``[1, h, is]`` (nk);
                both or neither.
            gate_up_scale, down_scale, shared_gate_up_scale, shared_down_scale: the
                per-output-channel float32 scales ``[e, n]`` of int8 weights (n = 2i, h, 2is, h).
            preset: routing and layout (default ``"pangu-pro-moe"``; also ``"deepseek-v3"``,
                their ``-small`` variants, and the ``-w8a8`` twins of all four, which take int8
                weights).
            router: a whole router config (fields as docs/merrouter.md) instead of the preset's.
            out_dtype: default hidden's dtype.
            mode, tiling: as in ``swiftgmm``.

        Returns:
            ``MoeOutput(out, topk_ids, topk_weights)``.
        """
        got = call(
            self._native,
            "moe",
            {"hidden": hidden, "gate_weight": gate_weight, "gate_up": gate_up, "down": down,
             "bias": bias, "router_scale": router_scale, "shared_gate_up": shared_gate_up,
             "shared_down": shared_down, "gate_up_scale": gate_up_scale, "down_scale": down_scale,
             "shared_gate_up_scale": shared_gate_up_scale, "shared_down_scale": shared_down_scale},
            {"preset": preset, "router": router, "layout": layout,
             "out_dtype": None if out_dtype is None else _arrays.dtype_name(out_dtype),
             "mode": mode, "tiling": tiling},
        )
        return MoeOutput(got["out"], got["topk_ids"], got["topk_weights"])

    def quantize(self, x: ArrayLike) -> QuantizeOutput:
        """Dynamic per-token int8 quantization (docs/quantize.md): per row ``scale = max|x| /
        127`` (an f32 division), ``q = round(x / scale)`` of the exact quotient, ties to even,
        saturated at +-127. Bit for bit the same on the GPU and in the reference. The
        activation format of W8A8 ``swiftgmm``.

        Args:
            x: ``[m, k]`` float32, float16 or bfloat16; k a multiple of 4.

        Returns:
            ``QuantizeOutput(q, scale)``: ``q [m, k]`` int8, ``scale [m]`` float32 (0 for a zero
            row or one whose scale underflows, with q 0; NaN for a row holding NaN or inf, with
            q 0).
        """
        got = call(self._native, "quantize", {"x": x}, {})
        return QuantizeOutput(got["q"], got["scale"])
