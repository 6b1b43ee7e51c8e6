"""Arrays in and out of the compiled module.

In: anything NumPy can take (an ndarray, an object with ``__dlpack__`` or ``__array__`` such as a
CPU torch tensor) becomes a C-contiguous little-endian array of one of the crate's dtypes, passed
as its bytes. Non-contiguous and byte-swapped arrays are copied; nothing else is converted (no
silent narrowing of float64 or int64: convert with ``.astype`` first).

Out: ``(bytearray, shape, dtype)`` becomes a writable ndarray that owns its memory.

bfloat16: with ``ml_dtypes`` installed, ``ml_dtypes.bfloat16`` arrays go in and bf16 outputs come
out as them. Without it, bf16 travels as ``uint16`` arrays of the bit patterns, both ways (a
``uint16`` input is always read as bf16 bits); ``bf16_to_f32`` / ``f32_to_bf16`` convert.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._errors import UnsupportedError

try:
    import ml_dtypes

    BFLOAT16: np.dtype | None = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # bf16 as uint16 bit patterns
    BFLOAT16 = None

# NumPy dtype -> the crate's dtype name.
_CRATE_DTYPE = {
    np.dtype(np.float32): "f32",
    np.dtype(np.float16): "f16",
    np.dtype(np.int32): "i32",
    np.dtype(np.uint32): "u32",
    np.dtype(np.uint16): "bf16",
}
if BFLOAT16 is not None:
    _CRATE_DTYPE[BFLOAT16] = "bf16"

_SUPPORTED = "float32, float16, bfloat16 (ml_dtypes, or uint16 bit patterns), int32 or uint32"


def _is_torch_bfloat16(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and str(getattr(x, "dtype", "")) == "torch.bfloat16"


def as_ndarray(name: str, x: Any) -> np.ndarray:
    """``x`` as an ndarray (no copy where NumPy can avoid one); ``name`` ("amla: q") goes into the
    error message."""
    if isinstance(x, np.ndarray):
        return x
    if _is_torch_bfloat16(x):
        # NumPy has no bfloat16: take the bits as int16 (same size) and read them as bf16 below.
        import torch

        return as_ndarray(name, x.view(torch.int16)).view(np.uint16)
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
    if dtype is None and a.dtype.name == "bfloat16":  # an ml_dtypes array made elsewhere
        dtype = "bf16"
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
    }[dtype]
    return np.frombuffer(data, dtype=numpy_dtype).reshape(shape)


def dtype_name(dtype: Any) -> str:
    """The crate's name (``f32``, ``f16``, ``bf16``, ``i32``, ``u32``) of a dtype given as a NumPy
    dtype, a type, or a name (``"bf16"``, ``"bfloat16"``, ``"float32"``...)."""
    if isinstance(dtype, str):
        aliases = {"bfloat16": "bf16", "float32": "f32", "float16": "f16", "half": "f16",
                   "int32": "i32", "uint32": "u32"}
        name = aliases.get(dtype.lower(), dtype.lower())
        if name in ("f32", "f16", "bf16", "i32", "u32"):
            return name
        raise UnsupportedError(f"dtype {dtype!r} is not supported; expected f32, f16, bf16, i32 or u32")
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
