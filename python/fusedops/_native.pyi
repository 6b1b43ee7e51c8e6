"""Type stub of the compiled module (src/lib.rs). Tensors cross as ``(bytes, shape, dtype)``:
``bytes`` a C-contiguous buffer (in) or a bytearray (out), ``dtype`` one of
``"f32" | "f16" | "bf16" | "i32" | "u32" | "i8" | "u8"``. Parameters are the JSON of
``fusedops run --params``. Errors are raised as the classes of ``fusedops._errors``."""

from typing import Any, Optional

Tensor = tuple[Any, list[int], str]

__version__: str
"""The version of the compiled crate, which equals the fusedops crate's."""

def run(op: str, inputs: dict[str, Tensor], params: str, /) -> dict[str, tuple[bytearray, list[int], str]]:
    """Run operator ``op`` on the GPU (the registry's ``run_named``), the GIL released."""

def reference(op: str, inputs: dict[str, Tensor], params: str, /) -> dict[str, tuple[bytearray, list[int], str]]:
    """The CPU reference of ``op`` (the registry's ``reference_named``), the GIL released."""

def info(probes: bool, /) -> str:
    """The JSON of ``fusedops info --json`` (the crate's ``suite::Info``): adapter, capabilities,
    cooperative-matrix fragment, kernel paths and optional roofline probes."""

def bench(
    op: Optional[str],
    preset: Optional[str],
    params: list[tuple[str, str]],
    iters: int,
    warmup: int,
    scale: str,
    /,
) -> str:
    """The bench report of the matching cases, as JSON (the crate's ``suite::run_bench``)."""

def quantize_cache(kv_cache: Tensor, kv_format: str, /) -> tuple[bytearray, list[int], str]:
    """AMLA's packed u8 cache of a float cache (the crate's ``amla::quantize_cache``); ``kv_format``
    as AMLA's parameter (``"fp8"`` or ``"int8"``). The GIL is released."""

def dtype_name(name: str, /) -> str:
    """The crate's name of a dtype given by any name it accepts (``"bfloat16"`` -> ``"bf16"``)."""

def operator_names() -> list[str]:
    """The registered operator names."""
