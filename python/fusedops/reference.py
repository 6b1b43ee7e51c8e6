"""The crate's CPU references (``fusedops::ops::<op>::reference``), with the same arguments and
result types as the GPU operators: ``fusedops.reference.amla(...)`` is to ``fusedops.amla(...)``
what the tests compare. They need no GPU. Floating outputs are the f64 results rounded to
float32 (``moe``: to ``out_dtype``, as the layer stores them); ``quantize`` returns the int8
codes and scales, which the GPU matches bit for bit.
"""

from . import _native
from ._ops import Operators

_cpu = Operators(_native.reference)
amla = _cpu.amla
swiftgmm = _cpu.swiftgmm
route = _cpu.route
moe = _cpu.moe
quantize = _cpu.quantize

__all__ = ["amla", "swiftgmm", "route", "moe", "quantize"]
