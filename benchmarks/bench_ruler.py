"""RULER-style long-context accuracy of the engine's attention systems, on a real model.

    python benchmarks/bench_ruler.py --model qwen2.5-coder-1.5b --samples 20          # GPU: 4K-32K
    python benchmarks/bench_ruler.py --model /tmp/model.gguf --lengths 8192 --offload  # + wave-offload
    python benchmarks/bench_ruler.py --model tiny --lengths 1536 --samples 1 --max-tokens 8   # CPU smoke
    python benchmarks/bench_ruler.py --model qwen2.5-coder-0.5b --server http://localhost:8000

Tasks (RULER's synthetic tasks, arXiv 2404.06654, generated here with a fixed seed; the
templates, needle sentences and generation rules are RULER's `scripts/data/synthetic`):
  niah_single     one needle "One of the special magic numbers for <key> is: <7 digits>." in essay
                  prose (RULER niah_single_2; _1 = in the repeated grass/sky noise, _3 = uuid values)
  niah_multikey   four needles with different keys, one asked (RULER niah_multikey_1; _2 = the
                  haystack is all needles, _3 = the same with uuid keys and values)
  niah_multivalue four values under one key, all asked
  niah_multiquery four keys, all asked
  vt              variable tracking: a chain of 4 hops "VAR B = VAR A" hidden in noise, with one
                  short worked example; the answer is every variable of the chain
  cwe             common words: a numbered list, 10 words 30 times each, the rest 3 times (6 and 1
                  below 4K); the 10 common ones asked; one worked example
  fwe             frequent coded words: Zipf(2) counts over random 6-letter words (the top one is
                  '...' noise); the three most frequent asked
  `--tasks ruler` runs all 11 (every niah variant).
Scoring, per sample in [0, 1], reported x100: string_match_all (share of the expected strings found
in the output, case-insensitive) for every task here; string_match_part (any one found) is there
for tasks with alternative answers (RULER's QA).

Lengths are the model's tokens: the chat-templated prompt plus the task's max_tokens fill the
target (RULER's convention: prompt + generation <= length), fit by the model's own tokenizer per
sample; `prompt_tokens` is in the results. Haystacks need no network: `--haystack essay` (default)
is prose generated from word lists (reproducible on any Python), `docs` is sentences of the Python
standard library's docstrings (real English, but it changes with the Python version); the noise
of niah_single_1 and vt is RULER's own.

Prompts are one user turn through the model's chat template, the question at its end; the answer
starts wherever the model starts it (RULER's answer prefix, which it appends after the assistant
tag, is `--answer-prefix`: in process only, since chat completions cannot pre-fill the reply).
Greedy, each system on the same token ids, one engine per system reused over tasks and lengths,
the samples of one length batched (continuous batching, prefill not sliced, so the schedule and
hence the batches are the same for every system). Systems:
  full          full attention
  wave          wave attention, default WaveConfig (1.8% retrieval + 23.2% estimation)
  wave-offload  the same with the KV in host memory (the wave buffer): `--offload`
  wave-100      WaveConfig(retrieval_frac=1.0, estimation_frac=0.0): every cluster exact, so it
                must equal full token for token; `same_as_full` is the share of identical outputs
  wave[NAME]    wave with WaveConfig fields changed, for ablations: `--wave-variant NAME:key=value,...`
  quest         Quest page top-k (attention "quest", retroinfer/attention/quest.py): pages of 16
                tokens ranked per query head by the min/max key bound, the last page and the first
                (sink) page always chosen, exact attention over the chosen pages only; at wave's
                token budget: at every step as many tokens as wave attends exactly then (sink +
                window + decoded tokens not yet indexed + ceil(1.8% of C) clusters of 16 tokens),
                `config.wave_exact_tokens`; `--quest-budget` sets another (a share or tokens). The
                results record its budget rule and the tokens it meant per length.
`--server URL` sends the same prompts through a running server's /v1/chat/completions with the
`openai` client (temperature 0, the same max_tokens) and scores them the same way (system "http";
the tokenizer of `--model` still fits the lengths, so give the model the server serves).
Results: benchmarks/results/ruler_<model>_<gpu>.json with the model spec, its file's md5, the
command line, per-task and mean scores per system and length, and every case's outputs.
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import inspect
import math
import random
import re
import string
import sys
import time
import uuid
from array import array
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, table, write_result  # noqa: E402

from retroinfer.config import ConfigError, EngineConfig, QuestConfig, WaveConfig  # noqa: E402

WORDS_DIR = Path(__file__).resolve().parent / "ruler_words"
DEFAULT_LENGTHS = (4096, 8192, 16384, 32768)

# -- RULER's text -----------------------------------------------------------------------------
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
DEPTHS = [round(x) for x in (100 * i / 39 for i in range(40))]     # np.linspace(0, 100, 40), rounded

TEMPLATES = {
    "niah": ("Some special magic {type_needle_v} are hidden within the following text. Make sure to "
             "memorize it. I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
             "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?",
             " The special magic {type_needle_v} for {query} mentioned in the provided text are"),
    "vt": ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
           "{context}\nQuestion: Find all variables that are assigned the value {query} in the text above.",
           " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables "
           "are assgined the value {query}, they are: "),
    "cwe": ("Below is a numbered list of words. In these words, some appear more often than others. "
            "Memorize the ones that appear most often.\n{context}\nQuestion: What are the 10 most common "
            "words in the above list?",
            " Answer: The top 10 words that appear most often in the list are:"),
    "fwe": ("Read the following coded text and track the frequency of each coded word. Find the three "
            "most frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. "
            "Please ignore the dots '....'. What are the three most frequently appeared words in the "
            "above coded text?",
            " Answer: According to the coded text above, the three most frequently appeared words are:"),
}


@dataclass(frozen=True)
class Task:
    kind: str                       # niah | vt | cwe | fwe
    max_tokens: int
    metric: str = "string_match_all"
    haystack: str = "essay"         # niah: essay | noise | needle
    key: str = "words"              # niah: words | numbers | uuids
    value: str = "numbers"
    num_k: int = 1
    num_v: int = 1
    num_q: int = 1


# RULER's synthetic.yaml; max_tokens: RULER's 128 / 30 / 120 / 50, the short ones raised because a
# chat model answers in a sentence of its own when the reply is not pre-filled with the prefix
_NIAH = dict(kind="niah", max_tokens=128)
TASKS = {
    "niah_single_1": Task(**_NIAH, haystack="noise"),
    "niah_single_2": Task(**_NIAH),
    "niah_single_3": Task(**_NIAH, value="uuids"),
    "niah_multikey_1": Task(**_NIAH, num_k=4),
    "niah_multikey_2": Task(**_NIAH, haystack="needle"),
    "niah_multikey_3": Task(**_NIAH, haystack="needle", key="uuids", value="uuids"),
    "niah_multivalue": Task(**_NIAH, num_v=4),
    "niah_multiquery": Task(**_NIAH, num_k=4, num_q=4),
    "vt": Task("vt", 64),
    "cwe": Task("cwe", 128),
    "fwe": Task("fwe", 64),
}
ALIASES = {"niah_single": "niah_single_2", "niah_multikey": "niah_multikey_1"}
DEFAULT_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe")


def task_of(name: str) -> Task:
    return TASKS[ALIASES.get(name, name)]


# -- scoring (RULER's evaluate.py) -------------------------------------------------------------
def postprocess(pred: str) -> str:
    return re.sub(r"[\x00-\x1f]", "\n", pred.strip()).strip()


def score_one(pred: str, refs: list[str], metric: str = "string_match_all") -> float:
    """One sample in [0, 1]: the share of `refs` in `pred` (all), or whether any is (part)."""
    p = postprocess(pred).lower()
    hits = [1.0 if r.lower() in p else 0.0 for r in refs]
    return (sum(hits) / len(hits)) if metric == "string_match_all" else max(hits)


def string_match_all(preds: list[str], refs: list[list[str]]) -> float:
    return 100 * sum(score_one(p, r, "string_match_all") for p, r in zip(preds, refs)) / len(preds)


def string_match_part(preds: list[str], refs: list[list[str]]) -> float:
    return 100 * sum(score_one(p, r, "string_match_part") for p, r in zip(preds, refs)) / len(preds)


# -- words and haystacks ----------------------------------------------------------------------
@lru_cache(None)
def words(kind: str) -> tuple[str, ...]:
    """wonderwords' noun / adjective / verb lists (see ruler_words/README.md)."""
    return tuple((WORDS_DIR / f"{kind}.txt").read_text().split())


@lru_cache(None)
def cwe_words() -> tuple[str, ...]:
    return tuple(sorted(set(words("nouns") + words("adjectives") + words("verbs"))))


_PROSE = [
    "the {a} {n} will {v} the {n} before the {n} can {v} it.",
    "every {n} should learn to {v} a {a} {n}.",
    "it is {a} to {v} the {n} when the {n} is {a}.",
    "nobody knows why the {n} would {v} its own {n}.",
    "a {n} that can {v} is more {a} than a {n} that cannot.",
    "most people never {v} the {a} {n} of their {n}.",
    "in the end, the {n} and the {n} both had to {v} the same {a} {n}.",
    "if you {v} the {n}, the {n} becomes {a}.",
    "when the {n} was {a}, we tried to {v} the {n} instead.",
    "the {n} did not {v} the {n}, but it did {v} the {a} {n}.",
    "what matters is not the {n} but how {a} the {n} feels when you {v} it.",
    "some say the {n} is {a}; others say it only wants to {v} the {n}.",
    "there is no {n} so {a} that a {n} cannot {v} it.",
    "the best way to {v} a {n} is to {v} the {n} first.",
    "for a long time the {n} seemed {a}, and no one wanted to {v} it.",
    "I once saw a {a} {n} {v} a {n} near the {n}.",
    "perhaps the {a} {n} was right to {v} the {n} after all.",
    "so the question is whether a {a} {n} can ever {v} a {n}.",
]


class Essay:
    """An endless, reproducible stream of sentences: generated prose ("essay") or the standard
    library's docstrings ("docs", repeated as RULER repeats its essays)."""

    def __init__(self, source: str = "essay", seed: int = 0):
        self.source, self.rng, self.sents = source, random.Random(f"essay:{seed}"), []
        self._docs = _docs_sentences() if source == "docs" else None

    def __call__(self, n: int) -> list[str]:
        while len(self.sents) < n:
            if self._docs is not None:
                self.sents += self._docs
            else:
                self.sents.append(self._prose())
        return self.sents[:n]

    def _prose(self) -> str:
        r = self.rng
        fill = {"n": lambda: r.choice(words("nouns")), "a": lambda: r.choice(words("adjectives")),
                "v": lambda: r.choice(words("verbs"))}
        s = re.sub(r"\{(\w)\}", lambda m: fill[m.group(1)](), r.choice(_PROSE))
        s = re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", s)
        return s[0].upper() + s[1:]


_DOC_MODULES = ("argparse", "asyncio", "bisect", "calendar", "collections", "contextlib", "copy", "csv",
                "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fractions", "functools",
                "gettext", "heapq", "http.client", "inspect", "io", "itertools", "json", "locale", "logging",
                "os", "pathlib", "pickle", "pprint", "queue", "random", "re", "sched", "shutil", "socket",
                "sqlite3", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap",
                "threading", "typing", "unittest", "urllib.request", "zipfile")


@lru_cache(None)
def _docs_sentences() -> list[str]:
    """Prose sentences of the docstrings of some standard modules and their public members, in a
    fixed order: no code lines, no digits (the needles' values are numbers)."""
    import importlib
    out = []
    for name in _DOC_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        objs = [mod] + [getattr(mod, a) for a in sorted(getattr(mod, "__all__", None) or dir(mod))
                        if not a.startswith("_") and hasattr(mod, a)]
        for obj in objs:
            doc = inspect.getdoc(obj) if inspect.ismodule(obj) or callable(obj) else None
            for para in (doc or "").split("\n\n"):
                lines = para.splitlines()
                if not lines or any(ln.startswith((" ", ">>>", "...")) or ln.strip().startswith(("-", "*", "|"))
                                    for ln in lines):
                    continue
                for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", " ".join(ln.strip() for ln in lines)):
                    if (30 <= len(s) <= 300 and s[-1] in ".!?" and s[0].isupper()
                            and not re.search(r"[\d{}_<>=()\[\]`*]|magic|::", s)):
                        out.append(s)
    seen, uniq = set(), []
    for s in out:
        if s not in seen:
            seen.add(s)
            uniq.append(s)
    if not uniq:
        raise ConfigError("--haystack docs: no docstring prose found (Python run with -OO?)")
    return uniq


# -- the task generators: (units n, rng) -> (user message, answers, meta) -------------------------
def _random_value(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(1000000, 9999999))
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return f"{rng.choice(words('adjectives'))}-{rng.choice(words('nouns'))}"


def gen_niah(t: Task, n: int, rng: random.Random, essay: Essay, answer_prefix: bool = False):
    keys: list[str] = []
    while len(keys) < t.num_k:
        k = _random_value(rng, t.key)
        if k not in keys:
            keys.append(k)
    values = [[_random_value(rng, t.value) for _ in range(t.num_v)] for _ in keys]
    type_v = t.value
    template, prefix = TEMPLATES["niah"]
    if t.num_q * t.num_v == 1:                                    # RULER's singular wording
        for a, b in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
            template, prefix = template.replace(a, b), prefix.replace(a, b)
        type_v = type_v[:-1]
    needles = [NEEDLE.format(type_needle_v=type_v, key=k, value=v) for k, vs in zip(keys, values) for v in vs]
    rng.shuffle(needles)
    queries = rng.sample(keys, t.num_q)
    answers = [v for q in queries for v in values[keys.index(q)]]
    query = queries[0] if len(queries) == 1 else ", ".join(queries[:-1]) + ", and " + queries[-1]
    n = max(n, len(needles))
    if t.haystack == "essay":
        sents = essay(n)
        at = sorted(int(n * d / 100) for d in rng.sample(DEPTHS, len(needles)))
        pieces, last = [], 0
        for pos, nd in zip(at, needles):
            pieces += sents[last:pos] + [nd]
            last = pos
        context = " ".join(pieces + sents[last:])
    else:
        if t.haystack == "noise":
            sents = [NOISE] * n
        else:                                                     # distractor needles
            sents = []
            while len(sents) < n:
                k = _random_value(rng, t.key)
                if k not in keys:
                    sents.append(NEEDLE.format(type_needle_v=t.value, key=k, value=_random_value(rng, t.value)))
        idx = sorted(rng.sample(range(n), len(needles)), reverse=True)
        for i, nd in zip(idx, needles):
            sents.insert(i, nd)
        at = sorted(idx)
        context = "\n".join(sents)
    text = template.format(type_needle_v=type_v, context=context, query=query)
    order = sorted(needles, key=context.find)
    meta = {"needles": order, "depths": [p / n for p in at], "queries": queries, "units": n}
    return text, answers, meta, prefix.format(type_needle_v=type_v, query=query) if answer_prefix else ""


def _vt_chain(rng: random.Random, hops: int, letters: int, value: str) -> tuple[list[str], list[str]]:
    names: list[str] = []
    while len(names) < hops + 1:
        v = "".join(rng.choices(string.ascii_uppercase, k=letters))
        if v not in names:
            names.append(v)
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(hops)]
    return names, chain


def _vt_text(rng: random.Random, num_noises: int, names_chain) -> str:
    names, chain = names_chain
    sents = [NOISE + "\n"] * max(num_noises, len(chain))
    pos = sorted(rng.sample(range(len(sents)), len(chain)))
    for j, (p, stmt) in enumerate(zip(pos, chain)):
        sents.insert(p + j, stmt)
    return " ".join(sents).replace(". \n", ".\n")


def gen_vt(t: Task, n: int, rng: random.Random, essay: Essay, answer_prefix: bool = False, hops: int = 4):
    template, prefix = TEMPLATES["vt"]
    ex_rng = random.Random(rng.random())
    ex = _vt_chain(ex_rng, hops, 3, "12345")                      # RULER's worked example
    example = (template.format(context=_vt_text(ex_rng, 12, ex), query="12345", num_v=hops + 1)
               + prefix.format(num_v=hops + 1, query="12345") + " ".join(ex[0]) + "\n\n")
    value = str(rng.randint(10000, 99999))
    names, chain = _vt_chain(rng, hops, 5, value)
    context = _vt_text(rng, n, (names, chain))
    text = example + template.format(context=context, query=value, num_v=hops + 1)
    meta = {"chain": chain, "value": value, "example_answer": ex[0], "units": n}
    return text, names, meta, prefix.format(num_v=hops + 1, query=value) if answer_prefix else ""


def _cwe_list(rng: random.Random, num_words: int, common: int, uncommon: int, num_cw: int = 10):
    pool = cwe_words()
    chosen = rng.sample(pool, min(num_words, len(pool)))
    cw, ucw = chosen[:num_cw], chosen[num_cw:]
    lst = cw * common + ucw * uncommon
    rng.shuffle(lst)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(lst)), cw


def gen_cwe(t: Task, n: int, rng: random.Random, essay: Essay, answer_prefix: bool = False, length: int = 4096):
    template, prefix = TEMPLATES["cwe"]
    ex_args, args = ((20, 3, 1), (6, 1)) if length < 4096 else ((40, 10, 3), (30, 3))
    ex_ctx, ex_ans = _cwe_list(rng, *ex_args)
    context, answers = _cwe_list(rng, max(n, 11), *args)
    example = (template.format(context=ex_ctx) + prefix + " "
               + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_ans)) + "\n")
    meta = {"common_repeats": args[0], "uncommon_repeats": args[1], "units": max(n, 11)}
    return example + template.format(context=context), answers, meta, prefix if answer_prefix else ""


def _zeta(a: float, terms: int = 100000) -> float:
    return sum(k ** -a for k in range(1, terms + 1)) + terms ** (1 - a) / (a - 1)


def gen_fwe(t: Task, n: int, rng: random.Random, essay: Essay, answer_prefix: bool = False, length: int = 4096,
            alpha: float = 2.0, word_len: int = 6):
    template, prefix = TEMPLATES["fwe"]
    size = max(8, length // 50)
    vocab: set[str] = set()
    while len(vocab) < size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=word_len)))
    vocab_l = sorted(vocab)
    rng.shuffle(vocab_l)
    vocab_l[0] = "..."                                            # the top-ranked word is noise
    z = _zeta(alpha)
    counts = [int(n * k ** -alpha / z) for k in range(1, len(vocab_l) + 1)]
    lst = [w for w, c in zip(vocab_l, counts) for _ in range(c)]
    rng.shuffle(lst)
    meta = {"counts": dict(zip(vocab_l[:6], counts[:6])), "units": n}
    return template.format(context=" ".join(lst)), vocab_l[1:4], meta, prefix if answer_prefix else ""


GENERATORS = {"niah": gen_niah, "vt": gen_vt, "cwe": gen_cwe, "fwe": gen_fwe}


# -- fitting a length -------------------------------------------------------------------------
@dataclass
class Sample:
    task: str
    length: int
    index: int
    text: str                       # the user message
    answers: list[str]
    metric: str
    max_tokens: int
    prompt_ids: array               # chat template (+ answer prefix), compact
    meta: dict = field(default_factory=dict)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)


def _plain_ids(tok, text: str) -> list[int]:
    inner = getattr(tok, "tok", None)                             # HFTokenizer
    if inner is not None:
        return list(inner.encode(text, add_special_tokens=False))
    return list(text.encode("utf-8"))                             # ByteTokenizer: bytes are ids


def prompt_ids(tok, text: str, prefix: str = "") -> list[int]:
    ids = list(tok.apply_chat_template([{"role": "user", "content": text}]))
    return ids + _plain_ids(tok, prefix) if prefix else ids


def fit_units(measure, budget: int, hint: tuple[int, float] | None = None, n_max: int = 10 ** 7,
              tol: float = 0.004) -> tuple[int, int]:
    """The largest n (near enough) with measure(n) <= budget, measure ~ linear in n. Secant steps
    from `hint` (n, tokens per unit) or from two small probes. Returns (n, measure(n))."""
    seen: dict[int, int] = {}

    def m(n: int) -> int:
        if n not in seen:
            seen[n] = measure(n)
        return seen[n]

    if hint:
        n0, rate = hint
        n0 = max(1, min(n_max, n0))
    else:
        a, b = 1, 64
        rate = max((m(b) - m(a)) / (b - a), 1e-3)
        n0 = max(1, min(n_max, int(b + (budget - m(b)) / rate)))
    n = n0
    for _ in range(12):
        t = m(n)
        slack = budget - t
        if 0 <= slack <= max(tol * budget, rate) or (slack >= 0 and n >= n_max):
            break
        others = [k for k in seen if k != n]
        if others:
            k = min(others, key=lambda x: abs(x - n))
            if seen[k] != t:
                rate = max(abs(seen[k] - t) / abs(k - n), 1e-3)
        step = slack / rate
        nxt = n + (math.floor(step * 0.995) if step > 0 else math.floor(step) - 1)
        nxt = max(1, min(n_max, nxt))
        if nxt == n:
            break
        n = nxt
    fits = [k for k, v in seen.items() if v <= budget]
    if not fits:
        n = min(seen)
        while n > 1 and m(n) > budget:
            n = max(1, n - max(1, math.ceil((m(n) - budget) / rate)))
        return n, m(n)
    best = max(fits)
    return best, seen[best]


def make_samples(tok, tasks: list[str], lengths: list[int], samples: int, seed: int = 0,
                 haystack: str = "essay", max_tokens: int | None = None, answer_prefix: bool = False,
                 log=lambda msg: None) -> list[Sample]:
    essay = Essay(haystack, seed)
    out = []
    for L in lengths:
        for name in tasks:
            t = task_of(name)
            mt = max_tokens or t.max_tokens
            budget = L - mt
            gen = GENERATORS[t.kind]
            extra = {"length": L} if t.kind in ("cwe", "fwe") else {}
            n_max = len(cwe_words()) if t.kind == "cwe" else 10 ** 7
            hint, t0 = None, time.perf_counter()
            for i in range(samples):
                def build(n: int, i=i):
                    rng = random.Random(f"ruler:{seed}:{name}:{L}:{i}")
                    return gen(t, n, rng, essay, answer_prefix, **extra)

                def measure(n: int) -> int:
                    text, _, _, prefix = build(n)
                    return len(prompt_ids(tok, text, prefix))

                n, got = fit_units(measure, budget, hint, n_max)
                if got > budget:
                    raise ConfigError(f"{name} at {L} tokens: the shortest prompt is {got} tokens, more than "
                                      f"{budget} (the length less max_tokens {mt})")
                text, answers, meta, prefix = build(n)
                ids = prompt_ids(tok, text, prefix)
                hint = (n, max(1e-3, len(ids) / max(n, 1)))
                out.append(Sample(name, L, i, text, list(answers), t.metric, mt, array("l", ids),
                                  {**meta, "answer_prefix": prefix}))
            log(f"  {name} @ {L}: {samples} sample(s), {out[-1].prompt_tokens} prompt tokens "
                f"+ {mt} max_tokens, {time.perf_counter() - t0:.1f} s")
    return out


# -- running the systems ----------------------------------------------------------------------
def parse_wave_variant(spec: str) -> tuple[str, WaveConfig]:
    """`NAME:key=value,key=value` -> ("wave[NAME]", the WaveConfig with those fields changed);
    values are read as int, float or string, the keys checked against WaveConfig's fields."""
    name, sep, body = spec.partition(":")
    if not sep or not name or not body:
        raise ConfigError(f"--wave-variant {spec!r}: expected NAME:key=value[,key=value...]")
    names = {f.name for f in fields(WaveConfig)}
    over = {}
    for item in body.split(","):
        key, eq, raw = item.partition("=")
        if not eq or key not in names:
            raise ConfigError(f"--wave-variant {spec!r}: {key!r} is not a WaveConfig field ({', '.join(sorted(names))})")
        for cast in (int, float, str):
            try:
                over[key] = cast(raw)
                break
            except ValueError:
                continue
    return f"wave[{name}]", WaveConfig(**over)     # a bad value fails here, before any model loads


def system_configs(names: list[str], base: dict, quest_budget: float | None = None,
                   variants: dict[str, WaveConfig] | None = None) -> dict[str, EngineConfig]:
    """`quest` runs beside `wave`'s WaveConfig (its default budget is wave's exact share);
    `variants` ("wave[NAME]" -> its WaveConfig) are wave systems for ablations."""
    wave100 = WaveConfig(retrieval_frac=1.0, estimation_frac=0.0)
    mk = {"full": dict(attention="full"), "wave": dict(attention="wave", wave=WaveConfig()),
          "wave-offload": dict(attention="wave", wave=WaveConfig(), offload=True),
          "wave-100": dict(attention="wave", wave=wave100),
          "quest": dict(attention="quest", wave=WaveConfig(), quest=QuestConfig(budget=quest_budget))}
    mk.update({n: dict(attention="wave", wave=w) for n, w in (variants or {}).items()})
    return {n: EngineConfig(**base, **mk[n]) for n in names}


def quest_available() -> bool:
    """Whether this engine has the quest backend (a checkout from before it has not)."""
    try:
        EngineConfig(attention="quest")
    except ConfigError:
        return False
    return True


def quest_budget_info(cfg: EngineConfig, samples: list[Sample]) -> dict:
    """The quest system's budget: its rule, and per length the mean tokens it attends per query
    head at the first and at the last possible decode step."""
    q = cfg.quest
    rule = ("wave's exactly attended tokens at each step (config.wave_exact_tokens: sink + window + decoded "
            "tokens not yet indexed + ceil(retrieval_frac * C) clusters of tokens_per_cluster tokens)"
            if q.budget is None else
            f"{q.budget:g} of the context" if q.budget <= 1 else f"{q.budget:g} tokens")
    per_len = {}
    for L in sorted({s.length for s in samples}):
        batch = [s for s in samples if s.length == L]
        at = lambda n_of: sum(min(q.budget_tokens(cfg.wave, s.prompt_tokens, n_of(s)), n_of(s))   # noqa: E731
                              for s in batch) / len(batch)
        per_len[str(L)] = {"first_step": at(lambda s: s.prompt_tokens + 1),
                           "last_step": at(lambda s: s.prompt_tokens + s.max_tokens)}
    return {**asdict(q), "rule": rule, "tokens": per_len}


def _stop_token_ids(tok) -> list[int]:
    """The chat template's turn-end tokens (a GGUF's eos can be <|endoftext|> while turns end
    with <|im_end|>)."""
    inner = getattr(tok, "tok", None)
    if inner is None:
        return []
    ids = []
    for name in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>"):
        i = inner.convert_tokens_to_ids(name)
        if isinstance(i, int) and i != inner.unk_token_id and i >= 0:
            ids.append(i)
    return ids


def run_engine(engine, batch: list[Sample]) -> list[dict]:
    """Every sample of `batch` through the engine at once (continuous batching), greedy."""
    from retroinfer.engine.sampling import SamplingParams
    stop = _stop_token_ids(engine.tokenizer)
    recs = {f"r{i}": {"ids": [], "text": "", "finish": None, "error": None} for i in range(len(batch))}
    for i, s in enumerate(batch):
        engine.add_request(f"r{i}", list(s.prompt_ids),
                           SamplingParams(max_tokens=s.max_tokens, temperature=0.0, stop_token_ids=stop))
    while engine.has_work():
        for o in engine.step():
            r = recs[o.request_id]
            r["ids"] += o.token_ids
            r["text"] += o.text
            if o.finished:
                r["finish"], r["error"] = o.finish_reason, o.error
    return [recs[f"r{i}"] for i in range(len(batch))]


def run_http(url: str, model: str | None, batch: list[Sample], concurrency: int = 4,
             timeout: float = 3600.0) -> tuple[str, list[dict]]:
    """The same prompts through a server's /v1/chat/completions (the official client, greedy)."""
    from openai import OpenAI
    base = url.rstrip("/")
    base = base if base.endswith("/v1") else base + "/v1"
    client = OpenAI(base_url=base, api_key="unused", timeout=timeout, max_retries=20)
    model = model or client.models.list().data[0].id

    def one(s: Sample) -> dict:
        try:
            r = client.chat.completions.create(model=model, temperature=0, max_tokens=s.max_tokens,
                                               messages=[{"role": "user", "content": s.text}])
        except Exception as e:   # the run goes on; the case scores 0 and says why
            return {"ids": None, "text": "", "finish": "error", "error": f"{type(e).__name__}: {e}"}
        use = r.usage
        return {"ids": None, "text": r.choices[0].message.content or "", "finish": r.choices[0].finish_reason,
                "error": None, "server_prompt_tokens": use.prompt_tokens if use else None}

    with ThreadPoolExecutor(max(1, concurrency)) as pool:
        return model, list(pool.map(one, batch))


def free_memory() -> None:
    """After `del engine`: its KV pools go before the next system's engine allocates its own."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- the model --------------------------------------------------------------------------------
def resolve(spec: str, log=lambda msg: None) -> str:
    try:
        from retroinfer.models.catalog import resolve_model
    except ImportError:
        return spec
    return resolve_model(spec, log=log)


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def model_files(spec: str, resolved: str) -> dict[str, str]:
    """md5 of the file the model came from: the GGUF (given, found in a directory, or the
    catalog's pulled copy), else the directory's weight files. Empty for presets."""
    from retroinfer.models.presets import is_preset
    if is_preset(spec):
        return {}
    try:
        from retroinfer.models import catalog
        if spec in catalog.CATALOG:
            p = catalog.pulled_path(spec)
            return {str(p): _md5(p)} if p.is_file() else {}
        from retroinfer.models.gguf import find_gguf
        g = find_gguf(Path(spec).expanduser())
        if g is not None:
            return {str(g): _md5(g)}
    except ImportError:
        p = Path(spec)
        if p.suffix == ".gguf" and p.is_file():
            return {str(p): _md5(p)}
    d = Path(resolved)
    files = (sorted(d.glob("*.safetensors")) or sorted(d.glob("*.bin"))) if d.is_dir() else []
    return {str(f): _md5(f) for f in files}


# -- the benchmark ----------------------------------------------------------------------------
def summarise(samples: list[Sample], outputs: dict[str, list[dict]], tasks: list[str]) -> dict:
    """Per system, per length: each task's score (x100) and their mean; over all lengths too."""
    lengths = sorted({s.length for s in samples})
    res = {}
    for sysname, outs in outputs.items():
        by = {}
        for L in lengths:
            row = {}
            for name in tasks:
                sc = [score_one(o["text"], s.answers, s.metric) for s, o in zip(samples, outs)
                      if s.task == name and s.length == L]
                if sc:
                    row[name] = 100 * sum(sc) / len(sc)
            if row:
                row["mean"] = sum(row.values()) / len(row)
                by[str(L)] = row
        means = [r["mean"] for r in by.values()]
        entry = {"scores": by, "mean": sum(means) / len(means) if means else None,
                 "errors": sum(1 for o in outs if o.get("error"))}
        if "full" in outputs and sysname != "full" and outs[0].get("ids") is not None:
            same = [o["ids"] == f["ids"] for o, f in zip(outs, outputs["full"])]
            entry["same_as_full"] = sum(same) / len(same)
        res[sysname] = entry
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True,
                    help="a catalog name (qwen2.5-coder-1.5b ...), a .gguf file, a Hugging Face directory, or tiny")
    ap.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS), help="in the model's tokens")
    ap.add_argument("--samples", type=int, default=10, help="per task and length (default 10)")
    ap.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS),
                    help=f"default {' '.join(DEFAULT_TASKS)}; 'ruler' = all of {', '.join(TASKS)}")
    ap.add_argument("--systems", nargs="+", default=None,
                    choices=["full", "wave", "wave-offload", "wave-100", "quest"],
                    help="default: full wave wave-100 quest (+ wave-offload with --offload)")
    ap.add_argument("--wave-variant", action="append", default=[], metavar="NAME:key=value,...",
                    help="also run wave with these WaveConfig fields changed, as system wave[NAME] "
                         "(repeatable), e.g. est0:estimation_frac=0 or win256:window=256")
    ap.add_argument("--quest-budget", type=float, default=None,
                    help="quest: tokens per query head, a share of the context in (0, 1] or a count "
                         "(default: wave's exactly attended tokens at each step)")
    ap.add_argument("--offload", action="store_true", help="also run wave-offload (KV in host memory)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--haystack", default="essay", choices=["essay", "docs"],
                    help="essay prose: generated from word lists (default) or stdlib docstrings")
    ap.add_argument("--max-tokens", type=int, default=None, help="override every task's max_tokens")
    ap.add_argument("--answer-prefix", action="store_true",
                    help="pre-fill the reply with RULER's answer prefix (in process only)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--max-batch", type=int, default=16, help="decode batch of the engine")
    ap.add_argument("--kv-budget-gb", type=float, default=None)
    ap.add_argument("--host-kv-gb", type=float, default=None, help="wave-offload: host pool")
    ap.add_argument("--server", default=None, help="score a running server (OpenAI API) instead of engines")
    ap.add_argument("--server-model", default=None, help="model name on the server (default: its first)")
    ap.add_argument("--concurrency", type=int, default=4, help="--server: requests in flight")
    ap.add_argument("--show", type=int, default=1, help="print this many outputs per task and system")
    ap.add_argument("--no-write", action="store_true", help="do not write benchmarks/results/")
    ap.add_argument("--name", default=None, help="results file stem (default ruler_<model>)")
    a = ap.parse_args(argv)
    log = lambda msg: print(msg, flush=True)  # noqa: E731

    tasks = list(TASKS) if a.tasks == ["ruler"] else a.tasks
    bad = [t for t in tasks if ALIASES.get(t, t) not in TASKS]
    if bad:
        ap.error(f"unknown task(s) {bad}; choose from {', '.join(list(ALIASES) + list(TASKS))} or 'ruler'")
    if a.server and a.answer_prefix:
        ap.error("--answer-prefix pre-fills the reply: chat completions cannot, so not with --server")
    has_quest = quest_available()
    if a.systems:
        systems = list(dict.fromkeys(a.systems + (["wave-offload"] if a.offload else [])))
    else:
        systems = ["full", "wave"] + (["wave-offload"] if a.offload else []) + ["wave-100"] + \
            (["quest"] if has_quest else [])
    variants = dict(parse_wave_variant(v) for v in a.wave_variant)
    systems += [n for n in variants if n not in systems]
    notes = []
    if not has_quest and not a.server:      # an engine from before attention/quest.py
        notes.append("quest: no Quest-style backend in this engine; left out, not emulated")
        systems = [s for s in systems if s != "quest"]
    if a.server:
        systems = ["http"]

    from retroinfer.engine.llm_engine import LLMEngine, load_model_config
    from retroinfer.engine.tokenizer import load_tokenizer
    t_all = time.perf_counter()
    model = resolve(a.model, log)
    checks = model_files(a.model, model)
    mcfg = load_model_config(model)
    tok = load_tokenizer(model)
    ctx = mcfg.max_position_embeddings
    lengths = [L for L in a.lengths if L <= ctx]
    for L in a.lengths:
        if L > ctx:
            notes.append(f"length {L}: beyond the model's context of {ctx} tokens, skipped")
    for n in notes:
        log(n)
    if not lengths:
        log("no length fits the model's context")
        return 2
    log(f"model {a.model} -> {model}" + "".join(f"; {Path(p).name} md5 {h}" for p, h in checks.items()))
    log(f"generating {len(tasks)} task(s) x {len(lengths)} length(s) x {a.samples} sample(s) ({a.haystack} haystack)")
    t0 = time.perf_counter()
    samples = make_samples(tok, tasks, lengths, a.samples, a.seed, a.haystack, a.max_tokens, a.answer_prefix, log)
    gen_s = time.perf_counter() - t0

    outputs: dict[str, list[dict]] = {}
    sys_info: dict[str, dict] = {}
    if a.server:
        outs, wall = [], {}
        for L in lengths:
            batch = [s for s in samples if s.length == L]
            t0 = time.perf_counter()
            served, got = run_http(a.server, a.server_model, batch, a.concurrency)
            wall[str(L)] = time.perf_counter() - t0
            outs += got
            mism = [(s.prompt_tokens, o["server_prompt_tokens"]) for s, o in zip(batch, got)
                    if o.get("server_prompt_tokens") not in (None, s.prompt_tokens)]
            log(f"http @ {L}: {len(batch)} requests in {wall[str(L)]:.1f} s"
                + (f"; server counted other prompt lengths in {len(mism)} (e.g. {mism[0]})" if mism else ""))
        outputs["http"] = outs
        sys_info["http"] = {"url": a.server, "served_model": served, "wall_s": wall}
    else:
        base = dict(model=model, dtype=a.dtype, device=a.device, max_batch=a.max_batch, prefill_budget_tokens=None,
                    kv_budget_bytes=int(a.kv_budget_gb * 2**30) if a.kv_budget_gb else None,
                    host_kv_budget_bytes=int(a.host_kv_gb * 2**30) if a.host_kv_gb else None)
        for name, cfg in system_configs(systems, base, a.quest_budget, variants).items():
            t0 = time.perf_counter()
            engine = LLMEngine(cfg)
            load_s = time.perf_counter() - t0
            outs, wall, stats = [], {}, {}
            for L in lengths:
                batch = [s for s in samples if s.length == L]
                t0 = time.perf_counter()
                outs += run_engine(engine, batch)
                wall[str(L)] = time.perf_counter() - t0
                # counters (offload: retrieved clusters, cache hits) are cumulative over the lengths
                stats[str(L)] = {k: v for k, v in engine.stats().items() if isinstance(v, (int, float, str, bool))}
                hit = stats[str(L)].get("cache_hit_ratio")
                log(f"{name} @ {L}: {len(batch)} requests in {wall[str(L)]:.1f} s"
                    + (f"; cache hit ratio so far {hit:.3f}" if hit is not None else ""))
            del engine
            free_memory()
            outputs[name] = outs
            sys_info[name] = {"attention": cfg.attention, "offload": cfg.offload,
                              "wave": asdict(cfg.wave) if cfg.attention == "wave" else None,
                              "load_s": load_s, "wall_s": wall, "stats": stats}
            if cfg.attention == "quest":
                sys_info[name]["quest"] = info = quest_budget_info(cfg, samples)
                log(f"quest budget: {info['rule']}; tokens per query head (first / last step): "
                    + ", ".join(f"{L}: {t['first_step']:.0f} / {t['last_step']:.0f}" for L, t in info["tokens"].items()))

    summary = summarise(samples, outputs, tasks)
    for name in outputs:
        summary[name].update(sys_info[name])
        for o in outputs[name]:
            if o.get("error"):
                log(f"{name}: a case failed: {o['error']}")
                break
    # a few outputs, to see what the model answers
    for name in outputs:
        shown: dict[str, int] = {}
        for s, o in zip(samples, outputs[name]):
            if shown.get(s.task, 0) < a.show:
                shown[s.task] = shown.get(s.task, 0) + 1
                log(f"[{name} {s.task} @ {s.length}] expected {s.answers}; got {postprocess(o['text'])[:200]!r}")

    cols = [t for t in tasks]
    rows = []
    for name in outputs:
        for L, row in summary[name]["scores"].items():
            rows.append({"system": name, "length": int(L), **row, "same_as_full": summary[name].get("same_as_full")})
    table(rows, ["system", "length"] + cols + ["mean", "same_as_full"])
    for name in outputs:
        extra = f", same as full {summary[name]['same_as_full']:.0%}" if "same_as_full" in summary[name] else ""
        log(f"{name}: mean {summary[name]['mean']:.2f}{extra}")
    for name in ["wave", "quest"] + list(variants):
        if name in summary and "full" in summary:
            log(f"{name} - full: {summary[name]['mean'] - summary['full']['mean']:+.2f} points")

    cases = [{"task": s.task, "length": s.length, "index": s.index, "prompt_tokens": s.prompt_tokens,
              "max_tokens": s.max_tokens, "answers": s.answers, "metric": s.metric,
              "meta": {k: v for k, v in s.meta.items() if k != "needles"},
              "outputs": {n: outputs[n][i]["text"] for n in outputs},
              "scores": {n: score_one(outputs[n][i]["text"], s.answers, s.metric) for n in outputs},
              "finish": {n: outputs[n][i]["finish"] for n in outputs}}
             for i, s in enumerate(samples)]
    data = {"model": a.model, "model_path": model, "model_md5": checks, "tasks": tasks,
            "task_defs": {t: asdict(task_of(t)) for t in tasks}, "lengths": lengths, "samples": a.samples,
            "seed": a.seed, "haystack": a.haystack, "answer_prefix": a.answer_prefix,
            "systems": summary, "notes": notes, "generate_s": gen_s, "wall_s": time.perf_counter() - t_all,
            "cases": cases, "env": environment()}
    if not a.no_write:
        stem = a.name or "ruler_" + re.sub(r"[^A-Za-z0-9.+-]+", "-", _display(a.model)).strip("-")
        write_result(stem + ("_http" if a.server else ""), data)
    return 0


def _display(spec: str) -> str:
    try:
        from retroinfer.models.catalog import display_name
        return display_name(spec)
    except ImportError:
        p = Path(spec)
        return p.stem if p.suffix == ".gguf" else (p.name or spec)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
