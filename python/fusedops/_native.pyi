"""Type stub of the compiled module (src/lib.rs). Tensors cross as ``(bytes, shape, dtype)``:
``bytes`` a C-contiguous buffer (in) or a bytearray (out), ``dtype`` one of
``"f32" | "f16" | "bf16" | "i32" | "u32"``. Parameters are the JSON of ``fusedops run --params``.
Errors are raised as the classes of ``fusedops._errors``."""

from typing import Any, Optional

Tensor = tuple[Any, list[int], str]

__version__: str
"""The version of the compiled crate, which equals the fusedops crate's."""

def run(op: str, inputs: dict[str, Tensor], params: str, /) -> dict[str, tuple[bytearray, list[int], str]]:
    """Run operator ``op`` on the GPU (the registry's ``run_named``), the GIL released."""

def reference(op: str, inputs: dict[str, Tensor], params: str, /) -> dict[str, tuple[bytearray, list[int], str]]:
    """The CPU reference of ``op`` (the registry's ``reference_named``), the GIL released."""

def info(probes: bool, /) -> str:
    """The adapter, capabilities, kernel paths and optional roofline probes, as JSON."""

def bench(
    op: Optional[str],
    preset: Optional[str],
    params: list[tuple[str, str]],
    iters: int,
    warmup: int,
    scale: str,
    /,
) -> str:
    """The bench report of the matching cases, as JSON."""

def operator_names() -> list[str]:
    """The registered operator names."""
