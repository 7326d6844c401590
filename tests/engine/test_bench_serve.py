"""benchmarks/bench_serve.py --trace on CPU: the in-process half of a trace replay on the tiny
preset, and the figures it derives from per-token timestamps."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_serve  # noqa: E402
import serve_trace as st  # noqa: E402


def test_trace_replays_in_process_on_tiny(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [
        "bench_serve.py", "--trace", "--model", "tiny", "--device", "cpu", "--streams", "3", "--gap-s", "0.05",
        "--prompt-tokens", "150", "--max-tokens", "8", "--prefill-budget", "64", "--warmup-tokens",
        "--in-process-only", "--repeat", "2", "--out", str(tmp_path), "--name", "smoke"])
    assert bench_serve.main() == 0
    out = capsys.readouterr().out
    assert "in_process#2" in out and "itl_p99_ms" in out
    data = json.loads(next(tmp_path.glob("smoke_*.json")).read_text())
    for mode in ("in_process", "in_process#2"):
        s = data["summary"][mode]
        assert s["ok"] == 3 and s["tokens"] == 24 and s["output_tok_s"] > 0
        assert 0 < s["ttft_p50_s"] <= s["ttft_p99_s"] and s["itl_p50_ms"] > 0
    assert data["info"]["in_process"]["engine_config"]["prefill_budget_tokens"] == 64
    assert [r["arrival_s"] for r in data["trace"]] == [0.0, 0.05, 0.1]
    assert {"torch", "python", "gpu", "ray"} <= set(data["env"]) and "--trace" in data["command"]
    for r in data["requests"]["in_process"]:
        assert len(r["token_s"]) == 8 and r["token_s"][0] >= r["arrival_s"]


def test_summary_from_timestamps():
    # a decodes at 0.1 s a token; b waits 0.25 s for its first token, meanwhile a's gaps count as
    # "during prefill"
    res = [{"rid": "a", "arrival_s": 0.0, "status": 200, "token_s": [0.1, 0.2, 0.3, 0.4]},
           {"rid": "b", "arrival_s": 0.15, "status": 200, "token_s": [0.4, 0.45]},
           {"rid": "c", "arrival_s": 0.2, "status": 429, "token_s": []}]
    s = st.summarize(res)
    assert s["ok"] == 2 and s["tokens"] == 6 and abs(s["wall_s"] - 0.45) < 1e-9
    assert abs(s["ttft_p50_s"] - 0.175) < 1e-9 and abs(s["itl_p50_ms"] - 100) < 1e-6
    assert abs(s["itl_during_prefill_p99_ms"] - 100) < 1e-6 and abs(s["itl_max_ms"] - 100) < 1e-6
    assert st.pct([1, 2, 3, 4], 50) == 2.5 and st.pct([5], 99) == 5
    assert [r.arrival_s for r in st.make_trace(3, 10, 2, gap_s=0.5)] == [0.0, 0.5, 1.0]


def test_in_process_half_runs_in_a_child_process():
    """Before an HTTP run the in-process half runs in a spawned child (its memory is returned
    before the server sizes its KV): same results as in this process."""
    trace = st.make_trace(2, 40, 4, gap_s=0.01)
    args = {"model": "tiny", "device": "cpu", "warmup_tokens": [], "max_batch": 2}
    runs, info = st.run_in_child(args, trace, 1)
    assert [len(r["token_s"]) for r in runs["in_process"]] == [4, 4]
    assert info["capacity_bytes"] > 0 and info["engine_config"]["max_batch"] == 2
