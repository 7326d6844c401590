"""Request bodies a hostile client sends: fields from the OpenAI and jobs APIs with out-of-range,
wrongly typed and unencodable values, truncated or corrupted JSON, and bytes that are not JSON.
Generation stays short (max_tokens <= 4) or is far too long (10**6, a 400)."""
from __future__ import annotations

import json
import random

VALUES = [None, 0, 1, -1, 2, 7, 2**31, 2**63, 2**64, -2**63 - 1, 1e-40, 1e-300, 1e300, 0.5, -0.0, 3.7, True, False,
          "", "x", "\ud800", "\x00", "a" * 300, [], [1, 2], [-1], [2**70], ["a"], [None], {}, {"a": 1}, [[1]],
          {"type": "text"}]
FIELDS = ["prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed",
          "stop", "stop_token_ids", "ignore_eos", "n", "stream", "stream_options", "model", "logprobs", "echo",
          "presence_penalty", "user", "response_format", "tools", "best_of", "suffix"]


def fuzz_body(rng: random.Random, path: str):
    body = {"max_tokens": rng.choice([1, 2, 4])}
    if path == "/v1/chat/completions" or (path == "/v1/jobs" and rng.random() < 0.3):
        body["messages"] = [{"role": rng.choice(["user", "system", "assistant", "robot"]),
                             "content": rng.choice(["hi", "\ud800", "", None, [{"type": "text", "text": "a"}],
                                                    [{"type": "image_url"}], 5])}]
    else:
        body["prompt"] = rng.choice(["hello", "\ud800x", "", [1, 2, 3], [], [10**9], ["one"], ["a", "b"],
                                     [65] * rng.randint(1, 400), "z" * rng.randint(1, 2000)])
    for _ in range(rng.choice([0, 0, 0, 1, 2, 3])):
        body[rng.choice(FIELDS)] = rng.choice(VALUES)
    if isinstance(body.get("max_tokens"), int) and not isinstance(body["max_tokens"], bool) and body["max_tokens"] > 4:
        body["max_tokens"] = rng.choice([4, 10**6])             # keep generation short, or far too long
    text = json.dumps(body)
    r = rng.random()
    if r < 0.08:                      # truncated or corrupted JSON
        text = text[: rng.randint(0, len(text))]
    elif r < 0.12:
        text = text.replace(":", rng.choice(["", "::", ": NaN,"]), 1)
    elif r < 0.15:
        return rng.choice([b"\xff\xfe\x00", b"null", b"[]", b"1e999", b'{"prompt": "' + b"\xc3" + b'"}'])
    return text.encode()
