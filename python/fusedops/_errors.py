"""The exceptions fusedops raises: one class per kind of ``fusedops::Error``, each carrying the
crate's message (which names the operator, the tensor and what was expected).

The compiled module raises them by name (``src/lib.rs``, ``to_py``); the array conversion in
``_arrays.py`` raises ``UnsupportedError`` itself for inputs that never reach the crate.
"""


class FusedopsError(Exception):
    """Base class of every fusedops error."""


class NoAdapterError(FusedopsError, RuntimeError):
    """No GPU adapter was found (no Vulkan/Metal/DX12 driver, or the environment filters
    ``WGPU_BACKEND`` / ``WGPU_ADAPTER_NAME`` excluded all). The message has the install hint."""


class ShapeError(FusedopsError, ValueError):
    """A tensor has the wrong shape or rank."""


class InvalidError(FusedopsError, ValueError):
    """A value is out of its allowed range: an index, an offset, a parameter."""


class UnsupportedError(FusedopsError, TypeError):
    """A dtype, mode or feature that the operator or the adapter does not support, or an input
    that is not a numeric array (object arrays, float64, ...)."""


class LimitError(FusedopsError):
    """The request needs more than a device limit allows."""


class DeviceError(FusedopsError, RuntimeError):
    """A validation error, out-of-memory or device loss reported by the GPU driver."""


class IoError(FusedopsError, OSError):
    """Reading or writing a file failed (the tiling cache)."""


class FormatError(FusedopsError, ValueError):
    """A parameter could not be parsed: an unknown name or value, a wrong type."""


__all__ = [
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
