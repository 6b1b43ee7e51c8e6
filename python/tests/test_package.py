"""The package itself: version, module surface, info()."""

import re
from pathlib import Path

import fusedops
from fusedops import _native

CRATE_TOML = Path(__file__).resolve().parents[2] / "Cargo.toml"
BINDING_TOML = Path(__file__).resolve().parents[1] / "Cargo.toml"


def package_version(cargo_toml):
    """The `version` of the [package] table (the first one in these manifests)."""
    return re.search(r'^version\s*=\s*"([^"]+)"', cargo_toml.read_text(), re.M).group(1)


def test_version_equals_the_crate_version():
    crate = package_version(CRATE_TOML)
    binding = package_version(BINDING_TOML)
    from importlib.metadata import version

    assert binding == crate, "python/Cargo.toml's version must equal the fusedops crate's"
    assert fusedops.__version__ == crate
    assert version("fusedops") == crate
    # The crate compiled into the module reports the same.
    assert fusedops.info()["environment"]["fusedops_version"] == crate


def test_stub_matches_the_compiled_module():
    stub = (Path(fusedops.__file__).parent / "_native.pyi").read_text()
    declared = set(re.findall(r"^def (\w+)\(", stub, re.M)) | {"__version__"}
    public = {name for name in dir(_native) if not name.startswith("_")} | {"__version__"}
    assert declared == public


def test_operators_and_info():
    assert fusedops.operators() == ["amla", "merrouter", "moe", "quantize", "swiftgmm"]
    info = fusedops.info()
    assert info["environment"]["adapter"]["name"]
    ops = {p["op"] for p in info["paths"]}
    assert {"amla", "merrouter", "moe", "swiftgmm"} <= ops
    assert info["roofline"] is None  # probes only when asked for
