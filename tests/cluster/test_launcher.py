"""`retroinfer cluster up --simulate-numa 2 | status | down` for real: two raylets on this host,
each bound to its half of the CPUs (and node 0's memory) in a preexec_fn or by numactl; the
binding is read back from inside a worker on each node; the `serve run` line `up` prints serves
tiny.yaml on it as printed. Only the processes `up` started are stopped. `status` without a
running recorded cluster says so instead of attaching to whatever Ray runs on the host."""
import json
import os
import signal
import subprocess
import sys
import tempfile

import httpx
import pytest
import yaml

pytest.importorskip("ray")

from retroinfer import cli  # noqa: E402
from retroinfer.cluster.host import launcher  # noqa: E402
from tests.serve_util import free_port, wait_for  # noqa: E402


@pytest.fixture
def no_ray_attach(monkeypatch):
    def status(address=None):
        raise AssertionError(f"status attached to Ray at {address!r}")
    monkeypatch.setattr(launcher, "status", status)


def test_status_with_no_cluster_recorded_says_so(tmp_path, monkeypatch, capsys, no_ray_attach):
    monkeypatch.setenv("RETROINFER_STATE_DIR", str(tmp_path))
    assert cli.main(["cluster", "status"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert f"no cluster recorded ({tmp_path / 'cluster.json'})" in err and "retroinfer cluster up" in err


def test_status_of_a_recorded_cluster_that_exited_says_so(tmp_path, capsys, no_ray_attach):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"address": "127.0.0.1:1", "nodes": [{"pid": gone.pid}]}))
    assert cli.main(["cluster", "status", "--state-file", str(state)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "is not running" in err


def test_serve_hint_names_address_auth_and_an_installed_yaml(monkeypatch, tmp_path):
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.chdir(tmp_path)                                   # not the repository
    words = launcher.serve_hint("10.0.0.1:6379").split()
    assert words[:2] == ["RAY_ADDRESS=10.0.0.1:6379", "RAY_AUTH_MODE=token"] and words[2:4] == ["serve", "run"]
    assert os.path.isabs(words[4]) and os.path.isfile(words[4]) and words[4].endswith("tiny.yaml")


def serve_the_hint(hint: str, env: dict, tmp_path) -> None:
    """Run the `serve run` line as printed, with its YAML moved off port 8000 (something else on
    the host may hold it); the app must answer a completion."""
    config = hint.split()[-1]
    doc = yaml.safe_load(open(config))
    port = free_port()
    doc["http_options"].update(host="127.0.0.1", port=port)
    moved = tmp_path / "tiny.yaml"
    moved.write_text(yaml.safe_dump(doc))
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(hint.replace(config, str(moved)), shell=True, env=env, cwd=tmp_path, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
            def healthy():
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                try:
                    return c.get("/health").status_code == 200
                except httpx.HTTPError:
                    return False
            wait_for(healthy, 240, interval=1.0, what="/health 200")
            r = c.post("/v1/completions", json={"prompt": "hello", "max_tokens": 4, "ignore_eos": True})
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 4
    finally:
        os.killpg(proc.pid, signal.SIGINT)                       # Ctrl-C: serve run shuts the app down
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to split")
def test_up_status_serve_down(tmp_path):
    # What a user's shell has: no Ray address or auth mode of its own (the hint must bring them).
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env["RETROINFER_STATE_DIR"] = str(tmp_path)
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
        (hint,) = [line.strip() for line in up.stdout.splitlines() if " serve run " in line]
        assert hint.startswith(f"RAY_ADDRESS={state['address']} ")
        assert ("RAY_AUTH_MODE=token" in hint) == bool(launcher.auth_env())
        serve_the_hint(hint, env, tmp_path)
    finally:
        down = cli("down")
    assert down.returncode == 0 and "stopped 2 nodes" in down.stdout
    for n in state["nodes"]:
        with pytest.raises(ProcessLookupError):
            os.kill(n["pid"], 0)
    assert not (tmp_path / "cluster.json").exists()
