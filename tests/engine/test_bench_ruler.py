"""benchmarks/bench_ruler.py on CPU: the task generators put the answers where they say, the
prompts fill the target length, the scoring is RULER's, and the harness runs end to end (engine
in process with the tiny preset, and through an OpenAI-compatible server)."""
import hashlib
import json
import re
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_ruler as br  # noqa: E402

from retroinfer.engine.tokenizer import ByteTokenizer, HFTokenizer  # noqa: E402

from tests.hf_models import make_tokenizer  # noqa: E402

NIAH = [t for t in br.TASKS if t.startswith("niah")]


@pytest.fixture(scope="module")
def byte_samples():
    return br.make_samples(ByteTokenizer(), list(br.TASKS), [8192], samples=2, seed=3)


def _by(samples, task):
    return [s for s in samples if s.task == task]


def _context(s):
    """The haystack: between the instruction line and the question line."""
    head = s.text.index("\n") + 1
    return s.text[head:s.text.rindex("\n")]


# -- generators -------------------------------------------------------------------------------
@pytest.mark.parametrize("task", NIAH)
def test_niah_needles_answers_and_depths(byte_samples, task):
    t = br.TASKS[task]
    for s in _by(byte_samples, task):
        ctx = _context(s)
        needles = s.meta["needles"]
        assert len(needles) == t.num_k * t.num_v
        for nd in needles:
            assert ctx.count(nd) == 1, nd
        # the answers are the values of the queried keys' needles, and only those
        asked = {v for nd in needles for q in s.meta["queries"] if f" for {q} is: " in nd
                 for v in [nd.rsplit(": ", 1)[1].rstrip(".")]}
        assert set(s.answers) == asked and len(s.answers) == t.num_q * t.num_v
        assert all(k in s.text.rsplit("\n", 1)[1] for k in s.meta["queries"]), "the question names the keys"
        for nd in needles:
            if not any(f" for {q} is: " in nd for q in s.meta["queries"]):
                assert nd.rsplit(": ", 1)[1].rstrip(".") not in s.answers      # a distractor
        if t.haystack == "needle":                                        # every line is a needle
            assert all(re.fullmatch(r"One of the special magic \w+ for \S+ is: \S+\.", ln)
                       for ln in ctx.split("\n"))
            for q in s.meta["queries"]:
                assert ctx.count(f" for {q} is: ") == 1
        # each needle sits at its depth of the haystack
        for nd, depth in zip(needles, s.meta["depths"]):
            assert abs(ctx.index(nd) / len(ctx) - depth) < 0.03, (nd, depth)
        value_re = {"numbers": r"\d{7}",
                    "uuids": r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}"}
        assert all(re.fullmatch(value_re[t.value], a) for a in s.answers)
        singular = t.num_q * t.num_v == 1
        assert s.text.startswith("A special magic" if singular else "Some special magic")


def _resolve_vt(text):
    values = {}
    for name, var, num in re.findall(r"VAR ([A-Z]+) = (?:VAR ([A-Z]+)|(\d+))", text):
        values[name] = num if num else values[var]          # the chain is in order: defined before use
    return values


def test_vt_chain_resolves_to_the_answer(byte_samples):
    for s in _by(byte_samples, "vt"):
        example, main = s.text.rsplit("Memorize and track", 1)
        values = _resolve_vt(main)
        value = s.meta["value"]
        assert sorted(n for n, v in values.items() if v == value) == sorted(s.answers)
        assert len(s.answers) == 5
        assert main.rsplit("\n", 1)[1].endswith(f"assigned the value {value} in the text above.")
        positions = [main.index(stmt) for stmt in s.meta["chain"]]
        assert positions == sorted(positions)
        ex = _resolve_vt(example)
        assert sorted(n for n, v in ex.items() if v == "12345") == sorted(s.meta["example_answer"])
        assert " ".join(s.meta["example_answer"]) in example      # the worked example gives its answer


def test_cwe_counts(byte_samples):
    for s in _by(byte_samples, "cwe"):
        example, main = s.text.rsplit("Below is a numbered list", 1)
        listed = main.split("\n")[1]
        entries = re.findall(r"(\d+)\. ([a-z]+)", listed)
        assert [int(i) for i, _ in entries] == list(range(1, len(entries) + 1))
        c = Counter(w for _, w in entries)
        assert all(c[a] == s.meta["common_repeats"] for a in s.answers) and len(s.answers) == 10
        assert all(n == s.meta["uncommon_repeats"] for w, n in c.items() if w not in s.answers)
        ex = Counter(re.findall(r"\d+\. ([a-z]+)", example.split("\n")[1]))
        top = [w for w, _ in ex.most_common(10)]
        assert set(top) == set(re.findall(r"\d+\. ([a-z]+)", example.split("\n")[-2].split("are:")[1]))


def test_fwe_top_three(byte_samples):
    for s in _by(byte_samples, "fwe"):
        coded = s.text.split("coded words. ", 1)[1].split("\nQuestion", 1)[0].split()
        c = Counter(w for w in coded if w != "...")
        ranked = c.most_common()
        assert [w for w, _ in ranked[:3]] == s.answers
        assert ranked[0][1] > ranked[1][1] > ranked[2][1] > ranked[3][1]
        assert Counter(coded)["..."] > ranked[0][1]                  # the noise word is the most frequent


def test_samples_are_deterministic_and_seeded():
    tok = ByteTokenizer()
    a = br.make_samples(tok, ["niah_single", "vt"], [3072], 2, seed=0)
    b = br.make_samples(tok, ["niah_single", "vt"], [3072], 2, seed=0)
    c = br.make_samples(tok, ["niah_single", "vt"], [3072], 2, seed=1)
    assert [s.text for s in a] == [s.text for s in b]
    assert [s.answers for s in a] != [s.answers for s in c]
    assert a[0].answers != a[1].answers                           # samples differ from each other
    assert list(a[0].prompt_ids) == tok.apply_chat_template([{"role": "user", "content": a[0].text}])


def _check_lengths(samples, tol=0.03):
    for s in samples:
        total = s.prompt_tokens + s.max_tokens
        assert (1 - tol) * s.length <= total <= s.length, (s.task, s.length, total)


def test_lengths_fit_with_byte_tokenizer(byte_samples):
    _check_lengths(byte_samples)


def test_lengths_fit_with_a_bpe_tokenizer(tmp_path):
    make_tokenizer(tmp_path, 384)
    tok = HFTokenizer(tmp_path)
    samples = br.make_samples(tok, list(br.DEFAULT_TASKS), [8192, 12000], 1, haystack="essay")
    _check_lengths(samples)
    for s in samples:
        assert list(s.prompt_ids) == br.prompt_ids(tok, s.text)


def test_docs_haystack_and_answer_prefix():
    tok = ByteTokenizer()
    s = br.make_samples(tok, ["niah_single"], [4096], 1, haystack="docs", answer_prefix=True)[0]
    assert s.meta["answer_prefix"].startswith(" The special magic number for ")
    ids = list(s.prompt_ids)
    assert ids[-len(s.meta["answer_prefix"]):] == list(s.meta["answer_prefix"].encode())
    assert not re.search(r"\d", _context(s).replace(s.meta["needles"][0], ""))
    _check_lengths([s])


# -- scoring ----------------------------------------------------------------------------------
def test_scoring_on_hand_made_outputs():
    refs = ["1234567", "7654321"]
    assert br.score_one("The numbers are 1234567 and 7654321.", refs) == 1.0
    assert br.score_one("Only 1234567 here", refs) == 0.5
    assert br.score_one("Only 1234567 here", refs, "string_match_part") == 1.0
    assert br.score_one("nothing", refs, "string_match_part") == 0.0
    assert br.score_one("", refs) == 0.0
    assert br.score_one("  vars: ABCDE,\x00fghij \n", ["abcde", "FGHIJ"]) == 1.0   # case, control chars
    assert br.postprocess(" a\x01b\t\n") == "a\nb"
    preds = ["1234567 7654321", "1234567", "none"]
    assert br.string_match_all(preds, [refs] * 3) == pytest.approx(100 * 1.5 / 3)
    assert br.string_match_part(preds, [refs] * 3) == pytest.approx(100 * 2 / 3)


def test_fit_units_finds_the_largest_fitting_n():
    for per, base, budget in [(7, 100, 5000), (1, 3, 999), (93, 40, 30000)]:
        n, t = br.fit_units(lambda n: base + per * n, budget)
        assert t == base + per * n <= budget and base + per * (n + 1) > budget - 0.004 * budget


def test_model_checksums(tmp_path):
    g = tmp_path / "m.gguf"
    g.write_bytes(b"GGUF not really")
    assert br.model_files(str(g), "unused") == {str(g): hashlib.md5(b"GGUF not really").hexdigest()}
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"weights")
    assert br.model_files(str(d), str(d)) == {str(d / "model.safetensors"): hashlib.md5(b"weights").hexdigest()}
    assert br.model_files("tiny", "tiny") == {}


# -- end to end -------------------------------------------------------------------------------
# 1280 tokens: past the wave index's minimum (sink + window + segment / 8 = 1092), so wave builds one
SMOKE = ["--model", "tiny", "--lengths", "1280", "--samples", "1", "--tasks", "niah_single", "fwe",
         "--max-tokens", "4", "--show", "0", "--kv-budget-gb", "0.1", "--max-batch", "4"]


def test_end_to_end_tiny(monkeypatch, capsys):
    written = []
    monkeypatch.setattr(br, "write_result", lambda name, data: written.append((name, data)))
    assert br.main(SMOKE) == 0
    (name, data), = written
    assert name == "ruler_tiny"
    out = capsys.readouterr().out
    assert "no Quest-style backend" not in out and "same_as_full" in out and "quest budget: wave's" in out
    s = data["systems"]
    assert set(s) == {"full", "wave", "wave-100", "quest"} and data["model_md5"] == {}
    for name in s:
        row = s[name]["scores"]["1280"]
        assert set(row) == {"niah_single", "fwe", "mean"} and s[name]["errors"] == 0
        if name in ("full", "quest"):
            assert s[name]["wave"] is None
        else:
            assert s[name]["wave"]["retrieval_frac"] > 0
    assert s["wave-100"]["wave"]["retrieval_frac"] == 1.0 and s["wave-100"]["wave"]["estimation_frac"] == 0.0
    assert s["wave-100"]["same_as_full"] == 1.0, "every cluster exact must give full attention's tokens"
    # quest at wave's exact share: past wave's index minimum, a sparse choice (tokens well under the prompt)
    q = s["quest"]
    assert q["attention"] == "quest" and q["quest"]["budget"] is None and q["quest"]["page_size"] == 16
    first = q["quest"]["tokens"]["1280"]["first_step"]
    assert 69 + 16 < first < 400, first           # sink + window + 1, plus ceil(1.8% of ~75 clusters) = 2 of 16
    assert q["stats"]["1280"]["quest_page_size"] == 16 and "same_as_full" in q
    assert len(data["cases"]) == 2
    for c in data["cases"]:
        assert c["prompt_tokens"] + 4 <= 1280 and set(c["outputs"]) == set(s)
    assert "command" in data["env"] and data["model"] == "tiny"
    json.dumps(data)                                              # serialisable


class _FakeOpenAI(BaseHTTPRequestHandler):
    answers: dict = {}
    bodies: list = []

    def log_message(self, *a):
        pass

    def _send(self, obj):
        raw = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self):
        self._send({"object": "list", "data": [{"id": "fake-model", "object": "model", "created": 0,
                                                  "owned_by": "test"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.bodies.append(body)
        text = body["messages"][-1]["content"]
        reply = "They are: " + ", ".join(self.answers.get(text, ["?"]))
        self._send({"id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": reply}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})


def test_server_mode_scores_the_replies(monkeypatch):
    samples = br.make_samples(ByteTokenizer(), ["niah_multivalue", "cwe"], [3072], 2)
    _FakeOpenAI.answers = {s.text: s.answers for s in samples}
    _FakeOpenAI.bodies = []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    written = []
    monkeypatch.setattr(br, "write_result", lambda name, data: written.append((name, data)))
    try:
        assert br.main(["--model", "tiny", "--lengths", "3072", "--samples", "2", "--tasks", "niah_multivalue",
                        "cwe", "--server", f"http://127.0.0.1:{srv.server_port}", "--show", "0"]) == 0
    finally:
        srv.shutdown()
    (name, data), = written
    assert name == "ruler_tiny_http" and set(data["systems"]) == {"http"}
    h = data["systems"]["http"]
    assert h["served_model"] == "fake-model" and h["scores"]["3072"]["mean"] == 100.0
    assert len(_FakeOpenAI.bodies) == 4
    for b in _FakeOpenAI.bodies:
        assert b["temperature"] == 0 and b["model"] == "fake-model" and b["max_tokens"] in (128,)
        assert b["messages"][0]["role"] == "user" and b["messages"][0]["content"] in _FakeOpenAI.answers


def test_wave_variants_parse_and_run(monkeypatch):
    assert br.parse_wave_variant("est0:estimation_frac=0") == ("wave[est0]", br.WaveConfig(estimation_frac=0))
    name, wave = br.parse_wave_variant("w:window=128,retrieval_frac=0.05,cache_fraction=auto")
    assert name == "wave[w]" and wave == br.WaveConfig(window=128, retrieval_frac=0.05, cache_fraction="auto")
    for bad in ("noname", "x:", "x:windw=3", "x:retrieval_frac=2"):
        with pytest.raises(br.ConfigError):
            br.parse_wave_variant(bad)
    written = []
    monkeypatch.setattr(br, "write_result", lambda name, data: written.append(data))
    assert br.main(SMOKE + ["--systems", "full", "--wave-variant", "all:retrieval_frac=1.0,estimation_frac=0"]) == 0
    s = written[0]["systems"]
    assert set(s) == {"full", "wave[all]"} and s["wave[all]"]["wave"]["retrieval_frac"] == 1.0
    assert s["wave[all]"]["same_as_full"] == 1.0, "a variant with every cluster exact gives full's tokens"
