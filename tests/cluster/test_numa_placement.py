"""Two simulated NUMA nodes (ray.cluster_utils.Cluster, each with {"numa_node": 1} and a numa
label): two replicas of a 2-stage CPU pipeline land one per node, each replica's stage actors in
its own placement group on its own node, and requests flow through the pipeline."""
import pytest

ray = pytest.importorskip("ray")
httpx = pytest.importorskip("httpx")

from tests.serve_util import cluster, free_port, start_app, wait_for  # noqa: E402


@pytest.fixture(scope="module")
def base_url():
    from ray import serve
    from ray.cluster_utils import Cluster
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "resources": {"numa_node": 1, "numa_node_0": 1}, "labels": {"numa": "0"},
        "include_dashboard": False})
    c.add_node(num_cpus=2, resources={"numa_node": 1, "numa_node_1": 1}, labels={"numa": "1"})
    ray.init(address=c.address, logging_level="error", log_to_driver=False)
    port = free_port()
    start_app({"model": "tiny", "device": "cpu", "num_replicas": 2, "gpus_per_replica": 2, "cpus_per_stage": 0.5,
               "num_cpus_per_replica": 0.5, "kv_pool_gb": 1 / 1024, "max_model_len": 2048,
               "routing_stats_period_s": 0.2}, port)
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()
    c.shutdown()


def test_one_replica_per_numa_node_with_its_stages(base_url):
    with httpx.Client(base_url=base_url, timeout=60) as client:
        wait_for(lambda: len(cluster(client)) == 2, 60, what="two replicas")
        infos = cluster(client, detail=True)
        assert sorted(i["labels"]["numa"] for i in infos) == ["0", "1"]
        for info in infos:
            assert info["placement_group"]
            stages = info["stages"]
            assert [s["layers"] for s in stages] == [[0, 2], [2, 4]]
            assert {s["node_id"] for s in stages} == {info["node_id"]}          # STRICT_PACK: same node
            assert {s["labels"]["numa"] for s in stages} == {info["labels"]["numa"]}
            assert info["stats"]["capacity_bytes"] == 1 << 20                   # kv_pool_gb over two stages

        body = {"prompt": "pipeline", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        outs = [client.post("/v1/completions", json=body) for _ in range(3)]
        assert all(r.status_code == 200 for r in outs)
        assert len({r.json()["choices"][0]["text"] for r in outs}) == 1
        jid = client.post("/v1/jobs", json={**body, "max_tokens": 4}).json()["id"]
        done = wait_for(lambda: (s := client.get(f"/v1/jobs/{jid}").json())["phase"] == "done" and s)
        assert done["prefill_progress"] == 1.0 and done["tokens_generated"] == 4
