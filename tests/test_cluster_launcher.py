"""`retroinfer cluster up --simulate-numa 2 | status | down` for real: two raylets on this host,
each bound to its half of the CPUs (and node 0's memory) in a preexec_fn or by numactl; the
binding is read back from inside a worker on each node. Only the processes `up` started are
stopped."""
import json
import os
import subprocess
import tempfile

import pytest

pytest.importorskip("ray")

from tests.serve_util import free_port  # noqa: E402


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to split")
def test_up_status_down(tmp_path):
    env = dict(os.environ, RETROINFER_STATE_DIR=str(tmp_path))
    temp_dir = tempfile.mkdtemp(prefix="ri", dir="/tmp")          # short: Ray puts sockets there
    port = str(free_port())

    def cli(*args, **kw):
        return subprocess.run(["retroinfer", "cluster", *args], env=env, capture_output=True, text=True,
                              timeout=240, **kw)
    try:
        up = cli("up", "--simulate-numa", "2", "--port", port, "--temp-dir", temp_dir)
        assert up.returncode == 0, up.stdout + up.stderr
        state = json.loads((tmp_path / "cluster.json").read_text())
        assert len(state["nodes"]) == 2
        st = cli("status", "--json")
        assert st.returncode == 0, st.stderr
        rows = json.loads(st.stdout)
        assert [r["numa"] for r in rows] == ["0", "1"]
        assert all(r["numa_node_resource"] == 1 for r in rows)
        cpus = [r["cpus"] for r in rows]
        assert cpus[0] != cpus[1] and all(r["num_cpus"] == 1 or len(os.sched_getaffinity(0)) > 2 for r in rows)
        for r in rows:
            if r["mempolicy"] is not None:
                assert r["mempolicy"]["mode"] == "bind"
    finally:
        down = cli("down")
    assert down.returncode == 0 and "stopped 2 nodes" in down.stdout
    for n in state["nodes"]:
        with pytest.raises(ProcessLookupError):
            os.kill(n["pid"], 0)
    assert not (tmp_path / "cluster.json").exists()
