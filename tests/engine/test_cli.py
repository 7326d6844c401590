"""`retroinfer generate` as a user meets it: every bad flag value is one error line and exit code 2
(no traceback), devices this torch cannot use are refused before anything loads, the help says
what the flags take and their defaults, and the prefill bar shows only for long prompts on a
terminal."""
import io
import sys
from pathlib import Path

import pytest
import torch
import yaml

from retroinfer import cli
from retroinfer.models.presets import preset_config

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--prompt", "hi", "--max-tokens", "2", "--device", "cpu"]


def run(*argv):
    """(exit code, stdout, stderr) of `retroinfer ARGV`, in this process."""
    out, err = io.StringIO(), io.StringIO()
    old = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        code = cli.main(list(argv))
    except SystemExit as e:         # argparse: usage errors, --help, --version
        code = e.code
    finally:
        sys.stdout, sys.stderr = old
    return code, out.getvalue(), err.getvalue()


def one_error_line(err: str) -> str:
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert "error:" in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("argv, says", [
    # argparse's own checks (types, choices, unknown flags)
    (["--max-tokens", "x"], "invalid int value: 'x'"),
    (["--temperature", "warm"], "invalid float value"),
    (["--seed", "x"], "invalid int value"),
    (["--dtype", "int8"], "invalid choice: 'int8'"),
    (["--attention", "sparse"], "invalid choice: 'sparse'"),
    (["--max-batch", "0"], "--max-batch: must be > 0"),
    (["--max-model-len", "0"], "--max-model-len: must be > 0"),
    (["--max-model-len", "-5"], "--max-model-len: must be > 0"),
    (["--prefill-chunk", "0"], "--prefill-chunk: must be > 0"),
    (["--kv-budget-gb", "0"], "--kv-budget-gb: must be > 0"),
    (["--kv-budget-gb", "-1"], "--kv-budget-gb: must be > 0"),
    (["--host-kv-gb", "-1", "--attention", "wave", "--offload"], "--host-kv-gb: must be > 0"),
    (["--stop-token-id", "-1"], "--stop-token-id: must be a token id >= 0"),
    (["--wave-window", "x"], "invalid int value"),
    (["--wave-cache-fraction", "abc"], "'abc' is neither a number nor 'auto'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    # sampling, engine and wave values
    (["--max-tokens", "0"], "max_tokens must be >= 1"),
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--top-k", "-1"], "top_k must be >= 0"),
    (["--top-p", "0"], "top_p must be in (0, 1]"),
    (["--top-p", "2"], "top_p must be in (0, 1]"),
    (["--stop", ""], "stop strings must be non-empty"),
    (["--offload"], "it needs attention 'wave'"),
    (["--attention", "wave", "--wave-retrieval-frac", "1.5"], "wave config: retrieval_frac"),
    (["--attention", "wave", "--wave-cache-fraction", "2"], "cache_fraction must be in [0, 1) or 'auto'"),
    (["--attention", "wave", "--wave-sink", "-1"], "sink must be >= 0"),
    (["--attention", "wave", "--wave-cache-slot-rows", "20"], "cache_slot_rows must be a positive multiple of 16"),
    # input
    (["--model", "/no/such/model"], "no such file or directory"),
    (["--model", "random:nope"], "unknown preset 'random:nope'"),
    (["--stop-token-id", "99999"], "--stop-token-id 99999: outside the vocabulary (size 320)"),
    (["--prompt", "x" * 20000], "exceeds the model's context of 16384 tokens"),
    # devices
    (["--device", "mps"], "--device mps: the engine runs on cpu or cuda"),
    (["--device", "xpu"], "--device xpu: the engine runs on cpu or cuda"),
    (["--device", "bogus"], "--device 'bogus': not a device"),
    (["--devices", "cpu,mps"], "--devices mps: the engine runs on cpu or cuda"),
])
def test_bad_value_is_one_error_line_and_exit_2(argv, says):
    code, out, err = run("generate", *FAST, *argv)
    assert code == 2, err
    assert says in one_error_line(err) and out == ""


def test_prompt_flags():
    for argv, says in [([], "give exactly one of --prompt and --prompt-file"),
                       (["--prompt", "a", "--prompt-file", "b"], "give exactly one"),
                       (["--prompt-file", "/no/such/file"], "--prompt-file /no/such/file: No such file")]:
        code, _, err = run("generate", *argv)
        assert code == 2 and says in one_error_line(err)
    code, _, err = run()
    assert code == 2 and "required: command" in one_error_line(err)


@pytest.mark.skipif(torch.backends.cuda.is_built(), reason="a CUDA build of torch")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_on_a_cpu_build_of_torch(device):
    code, _, err = run("generate", "--prompt", "hi", "--device", device)
    assert code == 2 and "is a CPU build" in one_error_line(err)


def test_cuda_without_a_visible_gpu_and_past_the_last_one(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run("generate", "--prompt", "hi", "--device", "cuda")
    assert code == 2 and "no CUDA GPU is visible" in one_error_line(err)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    code, _, err = run("generate", "--prompt", "hi", "--devices", "cuda:0,cuda:2")
    assert code == 2 and "--devices cuda:2: 2 CUDA GPU(s) visible (cuda:0 .. cuda:1)" in one_error_line(err)


def test_version_and_help():
    code, out, _ = run("--version")
    assert code == 0 and out.startswith("retroinfer 0.") and "torch" in out
    code, out, _ = run("--help")
    assert code == 0 and "long-context LLM inference" in out and "generate | cluster" not in out
    code, out, _ = run("generate", "--help")
    flat = " ".join(out.split())
    assert code == 0
    for says in ["'random:<arch>'", ".gguf file", "(default: tiny)", "(default: full)", "(default: 64)",
                 "(default: 0.0)", "'auto'", "(default: 0.05)", "(default: 16)", "smollm2-135m"]:
        assert says in flat, says
    assert "(default: None)" not in flat


def test_tiny_context_is_the_deployments():
    args = yaml.safe_load((ROOT / "deployments/tiny.yaml").read_text())["applications"][0]["args"]
    assert preset_config("tiny").max_position_embeddings == args["max_model_len"] == 16384


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_only_for_long_prompts_on_a_terminal(monkeypatch):
    assert not cli.wants_progress_bar(6, Terminal())
    assert not cli.wants_progress_bar(cli.PROGRESS_MIN_TOKENS, io.StringIO())     # a log file
    assert cli.wants_progress_bar(cli.PROGRESS_MIN_TOKENS, Terminal())
    long_prompt = "y" * cli.PROGRESS_MIN_TOKENS
    for prompt, bar in [("hi", False), (long_prompt, True)]:
        term = Terminal()
        monkeypatch.setattr(sys, "stdout", io.StringIO())
        monkeypatch.setattr(sys, "stderr", term)
        assert cli.main(["generate", "--prompt", prompt, "--max-tokens", "2", "--device", "cpu"]) == 0
        err = term.getvalue()
        assert ("\rprefill [" in err) == bar, err
        assert err.splitlines()[-1].startswith(f"prompt {len(prompt) + 1} tokens")   # BOS + bytes
    code, _, err = run("generate", "--prompt", long_prompt, "--max-tokens", "2", "--device", "cpu")
    assert code == 0 and "\r" not in err and err.count("\n") == 1                  # not a terminal
