"""Arrays in and out of the compiled module.

In: anything NumPy can take (an ndarray, an object with ``__dlpack__`` or ``__array__`` such as a
CPU torch tensor) becomes a C-contiguous little-endian array of one of the crate's dtypes, passed
as its bytes. Non-contiguous and byte-swapped arrays are copied; nothing else is converted (no
silent narrowing of float64 or int64: convert with ``.astype`` first).

Out: ``(bytearray, shape, dtype)`` becomes a writable ndarray that owns its memory.

bfloat16: with ``ml_dtypes`` installed, ``ml_dtypes.bfloat16`` arrays go in and bf16 outputs come
out as them. Without it, bf16 travels as ``uint16`` arrays of the bit patterns, both ways (a
``uint16`` input is always read as bf16 bits); ``bf16_to_f32`` / ``f32_to_bf16`` convert.

8-bit: ``int8`` is the crate's i8 (quantized weights and activations), both ways. ``uint8`` is its
u8, raw bytes whose meaning the operator defines (AMLA's packed 8-bit cache), both ways; an
``ml_dtypes.float8_e4m3fn`` array (FlashMLA holds its packed cache as one) goes in as its bytes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _native
from ._errors import FormatError, UnsupportedError

try:
    import ml_dtypes

    BFLOAT16: np.dtype | None = np.dtype(ml_dtypes.bfloat16)
    FLOAT8_E4M3FN: np.dtype | None = np.dtype(ml_dtypes.float8_e4m3fn)
except ImportError:  # bf16 as uint16 bit patterns; no float8 arrays to read
    BFLOAT16 = None
    FLOAT8_E4M3FN = None

# NumPy dtype -> the crate's dtype name.
_CRATE_DTYPE = {
    np.dtype(np.float32): "f32",
    np.dtype(np.float16): "f16",
    np.dtype(np.int32): "i32",
    np.dtype(np.uint32): "u32",
    np.dtype(np.uint16): "bf16",
    np.dtype(np.int8): "i8",
    np.dtype(np.uint8): "u8",
}
if BFLOAT16 is not None:
    _CRATE_DTYPE[BFLOAT16] = "bf16"
if FLOAT8_E4M3FN is not None:
    _CRATE_DTYPE[FLOAT8_E4M3FN] = "u8"

_SUPPORTED = ("float32, float16, bfloat16 (ml_dtypes, or uint16 bit patterns), int32, uint32, int8 "
              "or uint8 (raw bytes; ml_dtypes.float8_e4m3fn too)")

# Torch dtypes NumPy has no equivalent of -> the torch dtype of the same size whose bits NumPy
# reads, and the NumPy view that makes them the crate's dtype again.
_TORCH_BITS = {
    "torch.bfloat16": ("int16", np.uint16),
    "torch.float8_e4m3fn": ("uint8", np.uint8),
}


def _torch_bits(x: Any) -> tuple[str, Any] | None:
    if not type(x).__module__.startswith("torch"):
        return None
    return _TORCH_BITS.get(str(getattr(x, "dtype", "")))


def as_ndarray(name: str, x: Any) -> np.ndarray:
    """``x`` as an ndarray (no copy where NumPy can avoid one); ``name`` ("amla: q") goes into the
    error message."""
    if isinstance(x, np.ndarray):
        return x
    bits = _torch_bits(x)
    if bits is not None:
        # NumPy has no bfloat16 or float8: take the bits through a same-size integer dtype.
        import torch

        torch_dtype, numpy_dtype = bits
        return as_ndarray(name, x.view(getattr(torch, torch_dtype))).view(numpy_dtype)
    errors = []
    if hasattr(x, "__dlpack__"):
        try:
            return np.from_dlpack(x)
        except (TypeError, ValueError, BufferError, RuntimeError) as e:
            errors.append(f"DLPack: {e}")
    try:
        return np.asarray(x)
    except Exception as e:  # whatever __array__ raises (a GPU tensor, a tensor that needs grad)
        errors.append(f"__array__: {e}")
    raise UnsupportedError(
        f"{name} is a {type(x).__name__}, which cannot be read as an array ({'; '.join(errors)})"
    )


def to_native(name: str, x: Any) -> tuple[np.ndarray, list[int], str]:
    """``(bytes as a uint8 array, shape, crate dtype)`` for the compiled module; ``name``
    ("amla: q") goes into the error message."""
    a = as_ndarray(name, x)
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    dtype = _CRATE_DTYPE.get(a.dtype)
    if dtype is None:  # an ml_dtypes array made elsewhere
        dtype = {"bfloat16": "bf16", "float8_e4m3fn": "u8"}.get(a.dtype.name)
    if dtype is None:
        hint = ""
        if a.dtype == np.float64:
            hint = " (convert with .astype(np.float32))"
        elif a.dtype == np.int64:
            hint = " (convert with .astype(np.int32))"
        raise UnsupportedError(f"{name} has dtype {a.dtype}, expected {_SUPPORTED}{hint}")
    a = np.ascontiguousarray(a)
    return a.reshape(-1).view(np.uint8), list(a.shape), dtype


def from_native(item: tuple[bytearray, list[int], str]) -> np.ndarray:
    """A writable ndarray from the compiled module's ``(bytearray, shape, dtype)``."""
    data, shape, dtype = item
    numpy_dtype = {
        "f32": np.dtype(np.float32),
        "f16": np.dtype(np.float16),
        "bf16": BFLOAT16 if BFLOAT16 is not None else np.dtype(np.uint16),
        "i32": np.dtype(np.int32),
        "u32": np.dtype(np.uint32),
        "i8": np.dtype(np.int8),
        "u8": np.dtype(np.uint8),
    }[dtype]
    return np.frombuffer(data, dtype=numpy_dtype).reshape(shape)


def dtype_name(dtype: Any) -> str:
    """The crate's name (``f32``, ``f16``, ``bf16``, ``i32``, ``u32``, ``i8``, ``u8``) of a dtype
    given as a NumPy dtype, a type, or any name the crate accepts (``"bf16"``, ``"bfloat16"``,
    ``"float32"``, ``"int8"``...)."""
    if isinstance(dtype, str):
        try:
            return _native.dtype_name(dtype)
        except FormatError as e:
            raise UnsupportedError(str(e)) from None
    try:
        d = np.dtype(dtype)
    except TypeError as e:
        raise UnsupportedError(f"{dtype!r} is not a dtype: {e}") from None
    if d.name == "bfloat16":
        return "bf16"
    if d == np.uint16:
        raise UnsupportedError("uint16 is ambiguous as an output dtype: say \"bf16\"")
    name = _CRATE_DTYPE.get(d)
    if name is None:
        raise UnsupportedError(f"dtype {d} is not supported; expected {_SUPPORTED}")
    return name


def bf16_to_f32(bits: Any) -> np.ndarray:
    """bf16 values (``uint16`` bit patterns, or ``ml_dtypes.bfloat16``) widened to float32."""
    a = np.ascontiguousarray(as_ndarray("bf16_to_f32: bits", bits))
    if a.dtype.itemsize != 2:
        raise UnsupportedError(f"bf16_to_f32: bits has dtype {a.dtype}, expected 16-bit bf16 patterns")
    return (a.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(values: Any) -> np.ndarray:
    """float32 values rounded to bf16 (round to nearest even, NaN kept NaN), as ``uint16`` bit
    patterns; view them as ``ml_dtypes.bfloat16`` where it is installed."""
    a = np.ascontiguousarray(as_ndarray("f32_to_bf16: values", values), dtype=np.float32)
    bits = a.view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    quiet_nan = (bits >> 16) | 0x0040
    return np.where(np.isnan(a), quiet_nan, rounded).astype(np.uint16)
