"""benchmarks/bench_wave_error.py on CPU with the tiny preset: every cluster exact reproduces
exact attention in every layer; the default configuration does not (the harness measures)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_wave_error as bwe  # noqa: E402


def test_errors_per_layer_tiny(monkeypatch):
    written = []
    monkeypatch.setattr(bwe, "write_result", lambda name, data: written.append((name, data)))
    assert bwe.main(["--model", "tiny", "--length", "1600", "--task", "niah_single",
                     "--variant", "all:retrieval_frac=1.0,estimation_frac=0"]) == 0
    (name, data), = written
    rows = {r["system"]: r for r in data["rows"]}
    assert name == "wave_error_tiny" and set(rows) == {"wave", "wave[all]"}
    assert len(rows["wave"]["by_layer"]) == len(rows["wave[all]"]["by_layer"]) >= 2
    assert rows["wave[all]"]["max_layer_err"] < 1e-4, rows["wave[all]"]
    assert rows["wave"]["mean_rel_err"] > 100 * rows["wave[all]"]["mean_rel_err"]
