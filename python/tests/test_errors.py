"""Bad input of every kind raises the exception class of its kind, with the crate's message, and
never crashes the interpreter."""

import os
import subprocess
import sys

import numpy as np
import pytest

import fusedops
from fusedops import _native, reference

from test_ops import amla_inputs


@pytest.fixture
def amla_args(rng):
    return amla_inputs(rng, np.float32)


def test_classes_form_one_hierarchy():
    kinds = [fusedops.NoAdapterError, fusedops.ShapeError, fusedops.InvalidError,
             fusedops.UnsupportedError, fusedops.LimitError, fusedops.DeviceError,
             fusedops.IoError, fusedops.FormatError]
    for kind in kinds:
        assert issubclass(kind, fusedops.FusedopsError)
    assert issubclass(fusedops.ShapeError, ValueError)
    assert issubclass(fusedops.UnsupportedError, TypeError)


@pytest.mark.parametrize("backend", [fusedops, reference], ids=["gpu", "reference"])
def test_shape_error_names_the_tensor(amla_args, backend):
    q, kv, table, lens = amla_args
    with pytest.raises(fusedops.ShapeError, match=r"amla: q has shape \[2, 1, 4, 512\]"):
        backend.amla(q[..., :512], kv, table, lens)
    with pytest.raises(fusedops.ShapeError, match="cache_seqlens"):
        backend.amla(q, kv, table, lens[:1])
    with pytest.raises(fusedops.ShapeError):  # wrong rank
        backend.swiftgmm(np.zeros(8, np.float32), np.zeros((1, 8, 4), np.float32), counts=np.array([1], np.int32))


@pytest.mark.parametrize("backend", [fusedops, reference], ids=["gpu", "reference"])
def test_invalid_error(amla_args, backend):
    q, kv, table, lens = amla_args
    bad = table.copy()
    bad[0, 0] = kv.shape[0]  # a page id past the cache
    with pytest.raises(fusedops.InvalidError, match="amla"):
        backend.amla(q, kv, bad, lens)
    with pytest.raises(fusedops.InvalidError, match="page"):
        backend.amla(q, kv[:, :12], table, np.minimum(lens, 12))  # page 12: not a power of two
    with pytest.raises(fusedops.InvalidError, match="monotone"):
        backend.swiftgmm(np.zeros((4, 8), np.float32), np.zeros((2, 8, 4), np.float32),
                         offsets=np.array([0, 3, 2], np.int32))
    with pytest.raises(fusedops.InvalidError, match="preset"):
        backend.route(np.zeros((2, 64), np.float32), preset="mixtral")


def test_unsupported_error(amla_args):
    q, kv, table, lens = amla_args
    with pytest.raises(fusedops.UnsupportedError, match=r"amla: q has dtype float64.*astype"):
        fusedops.amla(q.astype(np.float64), kv, table, lens)
    with pytest.raises(fusedops.UnsupportedError, match="amla: block_table has dtype int64"):
        fusedops.amla(q, kv, table.astype(np.int64), lens)
    with pytest.raises(fusedops.UnsupportedError, match="object"):
        fusedops.amla(q.astype(object), kv, table, lens)
    with pytest.raises(fusedops.UnsupportedError, match="amla: unsupported"):
        fusedops.amla(q.view(np.int32), kv, table, lens)  # right size, integer dtype: the crate's
    with pytest.raises(fusedops.UnsupportedError):
        fusedops.amla(q, kv, table, np.array(["a", "b"]))
    with pytest.raises(fusedops.UnsupportedError, match="cache_seqlens has dtype object"):
        fusedops.amla(q, kv, table, object())


def test_limit_error():
    # The dispatch layout of 65536 experts needs ~513 KiB of workgroup memory; no GPU has that.
    e = 65536
    with pytest.raises(fusedops.LimitError, match="workgroup memory"):
        fusedops.route(np.zeros((1, e), np.float32), experts=e, groups=1, top_k=1,
                       selection="group-limited", k_group=1, group_score="max")


def test_format_error(amla_args):
    q, kv, table, lens = amla_args
    with pytest.raises(fusedops.FormatError, match="amla params: rescale: unknown variant `fast`, expected `amla` or `multiply`"):
        fusedops.amla(q, kv, table, lens, rescale="fast")
    with pytest.raises(fusedops.FormatError, match="split"):
        reference.amla(q, kv, table, lens, split="sometimes")
    with pytest.raises(fusedops.FormatError):
        fusedops.swiftgmm(np.zeros((4, 8), np.float32), np.zeros((1, 8, 4), np.float32),
                          counts=np.array([4], np.int32), layout=3)
    with pytest.raises(fusedops.InvalidError, match="not representable|JSON|Out of range"):
        fusedops.amla(q, kv, table, lens, softmax_scale=float("nan"))


def test_no_adapter_error_is_a_failure_with_the_install_hint():
    code = (
        "import fusedops\n"
        "try:\n"
        "    fusedops.info()\n"
        "except fusedops.NoAdapterError as e:\n"
        "    print('NoAdapterError:', e)\n"
    )
    env = dict(os.environ, WGPU_ADAPTER_NAME="no-such-adapter-fusedops-test")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "NoAdapterError: no GPU adapter found" in done.stdout
    assert "mesa-vulkan-drivers" in done.stdout and "WGPU_ADAPTER_NAME" in done.stdout


def test_non_contiguous_and_byte_swapped_inputs_are_copied(rng, amla_args):
    q, kv, table, lens = amla_args
    want = fusedops.amla(q, kv, table, lens)
    # The same values through a transposed view, a strided view and a big-endian copy.
    q_fortran = np.asfortranarray(q)
    kv_strided = np.repeat(kv, 2, axis=2)[:, :, ::2]
    assert not q_fortran.flags.c_contiguous and not kv_strided.flags.c_contiguous
    got = fusedops.amla(q_fortran, kv_strided, table.astype(">i4"), lens.astype(">i4"))
    np.testing.assert_array_equal(got.out, want.out)
    np.testing.assert_array_equal(got.lse, want.lse)


def test_inputs_are_never_written(amla_args):
    arrays = [a.copy() for a in amla_args]
    for a in arrays:
        a.setflags(write=False)  # read-only inputs are fine: nothing is written into them
    out, lse = fusedops.amla(*arrays)
    for a, original in zip(arrays, amla_args):
        np.testing.assert_array_equal(a, original)
    out[:] = 0  # results are new, writable arrays
    lse[:] = 0


@pytest.mark.parametrize(
    "inputs",
    [
        {"q": (b"abc", [2, 2], "f32")},  # fewer bytes than the shape needs
        {"q": (b"\0" * 16, [2, 2], "f64")},  # a dtype the crate has no name for
        {"q": (np.zeros(4, np.float32), [1], "f32")},  # not a byte buffer
        {"q": "not a tuple"},
        {"q": (b"", [1 << 62, 1 << 62], "f32")},  # an element count that overflows
    ],
)
def test_the_compiled_module_refuses_malformed_calls(inputs):
    with pytest.raises((fusedops.FusedopsError, TypeError, ValueError, BufferError)):
        _native.run("amla", inputs, "{}")
    with pytest.raises((fusedops.FusedopsError, TypeError)):
        _native.reference("amla", {}, "not json")
    with pytest.raises(fusedops.FormatError, match="unknown operator"):
        _native.run("nope", {}, "{}")
    with pytest.raises(TypeError):
        _native.run("amla")
