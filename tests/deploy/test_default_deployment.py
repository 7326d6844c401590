"""The embedded default (deployments/smollm2.yaml) answers a chat sensibly: SmolLM2-135M-Instruct,
a real model, with wave attention on CPU, through the official `openai` client. Skips when the
model cannot be had (offline, and not in the cache)."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from retroinfer.config import ConfigError  # noqa: E402
from retroinfer.models.catalog import resolve_model  # noqa: E402
from tests.serve_util import free_port, start_app, wait_for  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base_url():
    from ray import serve
    app = yaml.safe_load((REPO / "deployments/smollm2.yaml").read_text())["applications"][0]
    try:
        resolve_model(app["args"]["model"])
    except ConfigError as e:
        pytest.skip(f"SmolLM2 not available: {e}")
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="error", log_to_driver=False)
    port = free_port()
    start_app(app["args"], port)
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: httpx.get(url + "/health").status_code == 200, 180, 0.5, "the replica to be ready")
    yield url
    serve.shutdown()
    ray.shutdown()


@pytest.mark.parametrize("question, answer", [
    ("What is the capital of France? Answer in one sentence.", "paris"),
    ("What is 2 + 2? Answer with the number.", "4"),
])
def test_default_deployment_answers_a_chat(base_url, question, answer):
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused")
    r = client.chat.completions.create(model="smollm2-135m", temperature=0, max_tokens=32,
                                       messages=[{"role": "user", "content": question}])
    text = r.choices[0].message.content
    assert answer in text.lower(), text
    assert r.choices[0].finish_reason == "stop"        # the turn ends on the model's own stop token
