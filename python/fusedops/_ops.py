"""The operators, written once for both backends: ``fusedops.amla`` etc. run the GPU kernels
(``_native.run``) and ``fusedops.reference.amla`` etc. the crate's CPU references
(``_native.reference``), with the same arguments and result types.

Each call goes through the crate's operator registry with the tensor names and JSON parameters of
``fusedops run`` (README, "fusedops run tensors"): the crate validates everything and its defaults
apply to every parameter left as ``None``.
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
    """The four operators on one backend (GPU kernels or CPU references)."""

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
        rescale: Optional[Literal["amla", "multiply"]] = None,
        p_precision: Optional[Literal["f32", "f16"]] = None,
        split: Union[Literal["auto", "off"], dict, None] = None,
    ) -> AmlaOutput:
        """MLA decode attention over a paged latent KV cache (docs/amla.md).

        Args:
            q: ``[b, s_q, h_q, 576]`` float32, float16 or bfloat16 (512 latent + 64 rope dims).
            kv_cache: ``[num_blocks, page, 576]`` float32, float16 or bfloat16; V is the first
                512 columns. ``page`` is a power of two >= 16.
            block_table: ``[b, max_blocks]`` int32 page ids of each sequence (unused entries may
                hold anything, e.g. -1).
            cache_seqlens: ``[b]`` int32 keys in each sequence.
            softmax_scale: scale of q.k (default 1/sqrt(576)).
            causal: with s_q > 1, query i of a sequence of length L sees keys 0..=L-s_q+i
                (default False).
            rescale: ``"amla"`` (default: the output rescaled by an integer add on its exponent)
                or ``"multiply"``.
            p_precision: ``"f32"`` (default) or ``"f16"`` (P rounded to f16 before P.V).
            split: ``"auto"`` (default), ``"off"``, ``{"chunk": keys}`` or
                ``{"target_workgroups": n}``.

        Returns:
            ``(out, lse)``: the GPU's ``out`` is in q's dtype; the reference's is the exact f64
            result as float32. ``lse`` is float32.
        """
        got = call(
            self._native,
            "amla",
            {"q": q, "kv_cache": kv_cache, "block_table": block_table, "cache_seqlens": cache_seqlens},
            {"softmax_scale": softmax_scale, "causal": causal, "rescale": rescale,
             "p_precision": p_precision, "split": split},
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
        layout: Optional[Literal["kn", "nk"]] = None,
        activation: Optional[Literal["none", "swiglu"]] = None,
        out_dtype: Optional[DTypeLike] = None,
        mode: Optional[Literal["auto", "gemv", "gemm"]] = None,
        tiling: Union[Literal["cached", "tune", "defaults"], dict, None] = None,
    ) -> np.ndarray:
        """Grouped matmul for MoE experts: ``y[rows of g] = epilogue(x[rows of g] @ W_g)``
        (docs/swiftgmm.md).

        Args:
            x: ``[m_total, k]`` float32, float16 or bfloat16, rows sorted by group.
            w: ``[e, k, n]`` (layout ``"kn"``, default) or ``[e, n, k]`` (``"nk"``, PyTorch
                Linear), float32, float16 or bfloat16.
            offsets: ``[e + 1]`` int32/uint32: group g is rows ``offsets[g]:offsets[g+1]``.
            counts: ``[e]`` int32/uint32 rows per group from row 0. Give exactly one of the two.
            row_scale: ``[m_total]`` float32, multiplies each output row.
            activation: ``"none"`` (default) or ``"swiglu"`` (``n = 2i``; output ``[m_total, i]``,
                ``silu(gate) * up`` with gate the first i columns).
            out_dtype: output dtype (default float32). The reference always returns float32.
            mode: ``"auto"`` (default: GEMV or GEMM per group from its rows), ``"gemv"``,
                ``"gemm"``.
            tiling: ``"cached"`` (default), ``"tune"``, ``"defaults"`` or ``{"fixed": {...}}``.

        Returns:
            ``y [m_total, n_out]``; rows outside every group are zero.
        """
        got = call(
            self._native,
            "swiftgmm",
            {"x": x, "w": w, "offsets": offsets, "counts": counts, "row_scale": row_scale},
            {"layout": layout, "activation": activation,
             "out_dtype": None if out_dtype is None else _arrays.dtype_name(out_dtype),
             "mode": mode, "tiling": tiling},
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
        preset: Optional[Literal["pangu-pro-moe", "deepseek-v3"]] = None,
        experts: Optional[int] = None,
        groups: Optional[int] = None,
        top_k: Optional[int] = None,
        scoring: Optional[Literal["softmax", "sigmoid"]] = None,
        selection: Optional[Literal["moge", "group-limited"]] = None,
        k_group: Optional[int] = None,
        group_score: Optional[Literal["max", "sum-top2"]] = None,
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
        preset: Optional[str] = None,
        router: Optional[dict] = None,
        layout: Optional[Literal["nk", "kn"]] = None,
        out_dtype: Optional[DTypeLike] = None,
        mode: Optional[Literal["auto", "gemv", "gemm"]] = None,
        tiling: Union[Literal["cached", "tune", "defaults"], dict, None] = None,
    ) -> MoeOutput:
        """A whole MoE layer: router, grouped SwiGLU expert MLPs, optional shared expert,
        combine (docs/moe.md). The sizes h, i and the shared intermediate come from the tensors.

        Args:
            hidden: ``[t, h]`` float32/float16/bfloat16 (the activation dtype).
            gate_weight: ``[h, e]`` router weight.
            gate_up: ``[e, 2i, h]`` (layout ``"nk"``, default) or ``[e, h, 2i]`` (``"kn"``); gate
                = first i columns, up = last i.
            down: ``[e, h, i]`` (nk) or ``[e, i, h]`` (kn).
            bias, router_scale: ``[e]`` float32, as in ``route``.
            shared_gate_up, shared_down: the shared expert ``[1, 2is, h]``, ``[1, h, is]`` (nk);
                both or neither.
            preset: routing and layout (default ``"pangu-pro-moe"``; also ``"deepseek-v3"`` and
                their ``-small`` variants).
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
             "shared_down": shared_down},
            {"preset": preset, "router": router, "layout": layout,
             "out_dtype": None if out_dtype is None else _arrays.dtype_name(out_dtype),
             "mode": mode, "tiling": tiling},
        )
        return MoeOutput(got["out"], got["topk_ids"], got["topk_weights"])
