"""bench() returns the bench report as a dict."""

import pytest

import fusedops


def test_bench_report_for_one_case():
    report = fusedops.bench("merrouter", case={"t": 7, "e": 64}, scale="ci", iters=2, warmup=0)
    assert report["schema_version"] >= 1
    assert report["command"].startswith("fusedops.bench(")
    assert report["environment"]["adapter"]["name"]
    assert len(report["cases"]) >= 1
    for row in report["cases"]:
        assert row["check"]["case"]["op"] == "merrouter"
        assert row["check"]["pass"], row["check"]
        assert row["time"]["iters"] == 2 and row["time"]["median_us"] > 0


def test_bench_refuses_bad_filters():
    with pytest.raises(fusedops.FormatError, match="unknown operator"):
        fusedops.bench("attention")
    with pytest.raises(fusedops.InvalidError, match="no case matches"):
        fusedops.bench("merrouter", case={"t": "no-such-value"}, scale="ci")
    with pytest.raises(fusedops.InvalidError, match="scale"):
        fusedops.bench("merrouter", scale="huge")
    with pytest.raises(fusedops.InvalidError, match="iters"):
        fusedops.bench("merrouter", iters=0, scale="ci")
