"""The application's arguments (pydantic, extra keys forbidden) and how they become an engine
config and Serve placement (no Ray started)."""
from pathlib import Path

import pytest
import yaml

pytest.importorskip("ray")
from retroinfer.deployments.app import AppArgs, plan_replica  # noqa: E402

DEPLOY = Path(__file__).resolve().parents[2] / "deployments"
H100x8 = {"CPU": 128, "GPU": 8, "numa_node": 2}


def args_of(name):
    return yaml.safe_load((DEPLOY / name).read_text())["applications"][0]["args"]


@pytest.mark.parametrize("name", sorted(p.name for p in DEPLOY.glob("*.yaml")))
def test_every_yaml_validates(name, monkeypatch):
    args = args_of(name)
    if args["model"] != "tiny":
        monkeypatch.setenv("RETROINFER_MODEL_DIR", "random:llama3-8b")   # no weights here
    a = AppArgs.model_validate(args)
    assert yaml.safe_load((DEPLOY / name).read_text())["applications"][0]["import_path"] == \
        "retroinfer.deployments.app:build_app"
    plan_replica(a, H100x8)


def test_unknown_keys_and_bad_values_are_rejected():
    with pytest.raises(ValueError, match="extra"):
        AppArgs.model_validate({"model": "tiny", "num_replica": 2})
    with pytest.raises(ValueError, match="no such file or directory"):
        AppArgs.model_validate({"model": "/no/such/model"})
    with pytest.raises(ValueError, match="unknown wave option"):
        AppArgs.model_validate({"model": "tiny", "wave": {"windw": 32}})
    assert AppArgs.model_validate({"wave": {"window": 32}}).wave_config().window == 32
    with pytest.raises(ValueError, match="warmup_tokens must be >= 0"):
        AppArgs.model_validate({"model": "tiny", "warmup_tokens": [2048, -1]})


def test_warmup_tokens_is_a_length_or_a_list():
    assert AppArgs.model_validate({"model": "tiny"}).warmup_tokens == (2048,)
    assert AppArgs.model_validate({"model": "tiny", "warmup_tokens": 0}).warmup_tokens == ()
    assert AppArgs.model_validate({"model": "tiny", "warmup_tokens": [2048, 32768]}).warmup_tokens == (2048, 32768)


def test_qwen72b_is_one_four_stage_replica_per_numa_node(monkeypatch):
    monkeypatch.setenv("RETROINFER_MODEL_DIR", "random:qwen2.5-72b")
    a = AppArgs.model_validate(args_of("qwen72b.yaml"))
    assert a.model == "random:qwen2.5-72b"
    cfg, opts, serve_opts = plan_replica(a, H100x8)
    assert opts["executor"] == "ray" and opts["stages"] == 4 and opts["stage_num_gpus"] == 1
    bundles = serve_opts["placement_group_bundles"]
    assert serve_opts["placement_group_strategy"] == "STRICT_PACK"
    assert bundles[0] == {"CPU": 0.5, "numa_node": 1.0} and bundles[1:] == [{"CPU": 8, "GPU": 1.0}] * 4
    assert cfg.offload and cfg.host_kv_budget_bytes == 100 * 2**30          # 400 GB pool over 4 stages
    assert serve_opts["max_queued_requests"] == 64 and serve_opts["num_replicas"] == 2


def test_one_gpu_replicas_share_a_numa_node_and_cpu_needs_no_numa_resource(monkeypatch):
    monkeypatch.setenv("RETROINFER_MODEL_DIR", "random:qwen2.5-7b")
    cfg, opts, serve_opts = plan_replica(AppArgs.model_validate(args_of("qwen7b.yaml")), H100x8)
    assert opts["executor"] == "local" and serve_opts["placement_group_bundles"] == [
        {"CPU": 8.5, "GPU": 1.0, "numa_node": 0.25}]                          # 4 GPUs per NUMA node
    monkeypatch.delenv("RETROINFER_MODEL_DIR")
    cfg, opts, serve_opts = plan_replica(AppArgs.model_validate(args_of("tiny.yaml")), {"CPU": 2})
    assert cfg.device == "cpu" and not cfg.offload and cfg.kv_budget_bytes == 2**28
    assert serve_opts["placement_group_bundles"] == [{"CPU": 1.0}]          # fits a 2-core laptop
    cfg, opts, serve_opts = plan_replica(AppArgs.model_validate(args_of("tiny.yaml")),
                                         {"CPU": 2, "numa_node": 2})       # cluster up --simulate-numa 2
    assert serve_opts["placement_group_bundles"] == [{"CPU": 1.0, "numa_node": 1.0}]   # one node of 1 CPU
    assert opts["num_threads"] == 1
    cfg, opts, serve_opts = plan_replica(AppArgs.model_validate({"gpus_per_replica": 2, "gpu_fraction": 0.5}),
                                         {"CPU": 16, "GPU": 1})
    assert opts["executor"] == "ray" and opts["stage_num_gpus"] == 0.5     # two stages share one GPU


def test_jobs_store_path_and_the_ingress_node(tmp_path):
    from retroinfer.deployments.app import INGRESS_NODE, ingress_actor_options
    assert AppArgs.model_validate({}).jobs_db is None       # the ingress's $RETROINFER_JOBS_DB, else ~/.cache
    assert AppArgs.model_validate({"jobs_db": "/data/jobs.sqlite"}).jobs_db == "/data/jobs.sqlite"
    for bad in ("", str(tmp_path), "/data/"):
        with pytest.raises(ValueError, match="must name a file"):
            AppArgs.model_validate({"jobs_db": bad})
    a = AppArgs.model_validate({"ingress_num_cpus": 0.5})
    assert ingress_actor_options(a, H100x8) == {"num_cpus": 0.5}
    # A node that offers the ingress resource (the KubeRay head, which mounts the jobs volume) gets
    # the ingress, even with no CPU to offer.
    assert ingress_actor_options(a, {**H100x8, INGRESS_NODE: 1}) == {"num_cpus": 0, "resources": {INGRESS_NODE: 1}}


def test_step_timeout_reaches_the_replica_options():
    from retroinfer.cluster.serve.replica import ReplicaOptions
    _, opts, _ = plan_replica(AppArgs.model_validate({"model": "tiny"}), H100x8)
    assert opts["step_timeout_s"] == 600.0 and ReplicaOptions(**opts).step_timeout_s == 600.0
    _, opts, _ = plan_replica(AppArgs.model_validate({"model": "tiny", "step_timeout_s": None}), H100x8)
    assert opts["step_timeout_s"] is None
    with pytest.raises(ValueError):
        AppArgs.model_validate({"model": "tiny", "step_timeout_s": 0})
