"""One Ray node per NUMA node on this host.

Each node runs `ray start --block` (the first is the head) under `numactl --cpunodebind=N
--membind=N` when numactl exists, else with CPU affinity and a bind memory policy set in a
`preexec_fn`; either way the raylet and every worker it spawns inherit the binding. The node gets
`CUDA_VISIBLE_DEVICES` = its local GPUs (PCI bus order), `--num-gpus`, the resources
`{"numa_node": 1, "numa_node_N": 1}` and the label `numa=N`.

`up` records the process ids of the `ray start --block` processes in a state file; `down` stops
exactly those (SIGTERM, which makes each tear down the processes it started; then SIGKILL of its
process group). Nothing is stopped by name, so other Ray instances on the host are left alone.

Ray is imported inside the functions that talk to it: the `retroinfer` command line imports this
module, and `generate`, `cluster topology` and `cluster up --dry-run --host` run without Ray (the
`serve` extra).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from retroinfer import deployments, numa

from .topology import Topology

WORKER_PORTS_PER_NODE = 1000


def default_state_file() -> Path:
    root = os.environ.get("RETROINFER_STATE_DIR") or Path.home() / ".retroinfer"
    return Path(root) / "cluster.json"


@dataclass
class NodePlan:
    numa: int
    head: bool
    cpus: list[int]
    mem_nodes: list[int]          # real NUMA nodes whose memory this node is bound to
    gpus: list[int]
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    binder: str = "numactl"       # "numactl" (argv starts with numactl) or "preexec"

    def describe(self) -> str:
        envs = " ".join(f"{k}={v}" for k, v in self.env.items())
        how = "" if self.binder == "numactl" else \
            f"  # bound in preexec_fn: cpus {numa.format_cpulist(self.cpus)}, membind {self.mem_nodes}"
        return f"{envs} {' '.join(_quote(a) for a in self.argv)}{how}".strip()


def _quote(a: str) -> str:
    return f"'{a}'" if any(c in a for c in " {}\"") else a


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def node_ip() -> str:
    from ray._private.services import get_node_ip_address
    return get_node_ip_address()


def auth_env() -> dict[str, str]:
    """Token auth for every node and client alike: Ray turns it on for a head when a token exists
    (~/.ray/auth_token), but a joining node or client must be told."""
    if os.environ.get("RAY_AUTH_MODE"):
        return {"RAY_AUTH_MODE": os.environ["RAY_AUTH_MODE"]}
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    return {"RAY_AUTH_MODE": "token"} if os.environ.get("RAY_AUTH_TOKEN") or token_file.exists() else {}


def serve_hint(address: str, config: str = "tiny.yaml") -> str:
    """The `serve run` command line for a cluster `up` started: its address, its auth mode (the
    nodes use token auth when a token exists; a client without it gets InvalidAuthToken) and the
    installed deployment YAML, so that it works from any directory."""
    path = Path(deployments.__file__).with_name(config)
    rel = os.path.relpath(path)
    shown = rel if not rel.startswith("..") else str(path)
    envs = " ".join(f"{k}={v}" for k, v in {"RAY_ADDRESS": address, **auth_env()}.items())
    return f"{envs} serve run {shown}"


def recorded_address(state_file: Path) -> tuple[str | None, str | None]:
    """(the address `up` recorded, None), or (None, why there is none to use)."""
    if not state_file.exists():
        return None, (f"no cluster recorded ({state_file}); start one with `retroinfer cluster up`, "
                      "or pass --address")
    state = json.loads(state_file.read_text())
    if not any(_alive(n["pid"]) for n in state.get("nodes", [])):
        return None, (f"the cluster recorded in {state_file} is not running (its nodes exited); "
                      "`retroinfer cluster down` clears the record")
    return state["address"], None


def plan(topo: Topology, *, host: str | None = None, port: int = 6379, use_numactl: bool | None = None,
         temp_dir: str | None = None, object_store_fraction: float = 0.3, worker_port_base: int = 20000,
         extra_args: list[str] | None = None) -> list[NodePlan]:
    """The `ray start` command of every node. `use_numactl` None: when numactl is installed."""
    numactl = shutil.which("numactl") if use_numactl in (None, True) else None
    if use_numactl and not numactl:
        raise RuntimeError("numactl requested but not installed")
    host = host or node_ip()
    address = f"{host}:{port}"
    workers = range(worker_port_base, worker_port_base + len(topo.nodes) * WORKER_PORTS_PER_NODE)
    taken = {port}

    def fresh() -> str:
        """A port free now and not yet given in this plan: the OS may hand a just-probed port out
        again, and two daemons of one node on the same port fail its start."""
        while (p := free_port()) in taken or p in workers:
            pass
        taken.add(p)
        return str(p)

    plans = []
    for i, node in enumerate(topo.nodes):
        real = node.simulated_from if node.simulated_from is not None else node.id
        argv = ["ray", "start", "--block", "--disable-usage-stats",
                "--num-cpus", str(len(node.cpus)), "--num-gpus", str(len(node.gpus)),
                "--resources", json.dumps({"numa_node": 1, f"numa_node_{node.id}": 1}),
                "--labels", f"numa={node.id}",
                "--node-manager-port", fresh(), "--object-manager-port", fresh(),
                "--dashboard-agent-listen-port", fresh(), "--dashboard-agent-grpc-port", fresh(),
                "--metrics-export-port", fresh(), "--runtime-env-agent-port", fresh(),
                "--min-worker-port", str(worker_port_base + i * WORKER_PORTS_PER_NODE),
                "--max-worker-port", str(worker_port_base + (i + 1) * WORKER_PORTS_PER_NODE - 1)]
        if node.mem_total_bytes:
            argv += ["--object-store-memory", str(int(node.mem_total_bytes * object_store_fraction))]
        if i == 0:
            argv += ["--head", "--port", str(port), "--node-ip-address", host, "--include-dashboard", "false",
                     "--ray-client-server-port", fresh()]
        else:
            argv += ["--address", address, "--node-ip-address", host]
        if temp_dir:
            argv += ["--temp-dir", temp_dir]
        argv += list(extra_args or [])
        binder = "preexec"
        if numactl:
            cpu_arg = f"--cpunodebind={real}" if not topo.simulated else f"--physcpubind={numa.format_cpulist(node.cpus)}"
            argv = [numactl, cpu_arg, f"--membind={real}"] + argv
            binder = "numactl"
        env = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, node.gpu_indices)), "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
               **auth_env()}
        plans.append(NodePlan(node.id, i == 0, list(node.cpus), [real], node.gpu_indices, argv, env, binder))
    return plans


def _wait_port(host: str, port: int, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the head node exited (code {proc.returncode}); see its log")
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"the head node did not open {host}:{port} within {timeout:.0f}s")


def _spawn(p: NodePlan, log_path: Path) -> subprocess.Popen:
    env = dict(os.environ, **p.env)
    preexec = None
    if p.binder == "preexec":
        cpus, mem = p.cpus, p.mem_nodes
        preexec = lambda: numa.bind_process(cpus, mem)   # noqa: E731  (runs in the child)
    log = open(log_path, "ab")
    ray_exe = Path(sys.executable).with_name("ray")
    ray_exe = str(ray_exe) if ray_exe.exists() else (shutil.which("ray") or "ray")
    argv = [ray_exe if a == "ray" and i == p.argv.index("ray") else a for i, a in enumerate(p.argv)]
    return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            preexec_fn=preexec, start_new_session=True)


def up(plans: list[NodePlan], *, host: str | None, port: int, state_file: Path | None = None,
       timeout: float = 120.0) -> dict:
    state_file = state_file or default_state_file()
    if state_file.exists():
        old = json.loads(state_file.read_text())
        if any(_alive(n["pid"]) for n in old.get("nodes", [])):
            raise RuntimeError(f"a cluster started by `retroinfer cluster up` is running ({state_file}); "
                               "run `retroinfer cluster down` first")
    state_file.parent.mkdir(parents=True, exist_ok=True)
    log_dir = state_file.parent / "logs"
    log_dir.mkdir(exist_ok=True)
    host = host or node_ip()
    temp_dir = next((p.argv[p.argv.index("--temp-dir") + 1] for p in plans if "--temp-dir" in p.argv), None)
    state = {"address": f"{host}:{port}", "temp_dir": temp_dir, "started": time.time(), "nodes": []}
    try:
        for p in plans:
            log = log_dir / f"numa{p.numa}.log"
            proc = _spawn(p, log)
            state["nodes"].append({**asdict(p), "pid": proc.pid, "log": str(log)})
            state_file.write_text(json.dumps(state, indent=1))
            if p.head:
                _wait_port(host, port, timeout, proc)
        _wait_nodes(state["address"], len(plans), timeout)
    except BaseException:
        down(state_file)
        raise
    return state


def _wait_nodes(address: str, n: int, timeout: float) -> None:
    code = ("import ray,time,sys\nray.init(address=sys.argv[1], logging_level='error', log_to_driver=False)\n"
            "t=time.time()\nwhile sum(x['Alive'] for x in ray.nodes())<int(sys.argv[2]):\n"
            "    if time.time()-t>float(sys.argv[3]): sys.exit('timed out waiting for nodes')\n"
            "    time.sleep(0.5)\n")
    r = subprocess.run([sys.executable, "-c", code, address, str(n), str(timeout)], env=dict(os.environ, **auth_env()),
                       capture_output=True, text=True, timeout=timeout + 60)
    if r.returncode:
        raise RuntimeError(f"the nodes did not come up: {r.stderr.strip().splitlines()[-1:]}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:   # a zombie child of this process counts as gone
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return True


def down(state_file: Path | None = None, timeout: float = 30.0) -> list[int]:
    """Stop the processes `up` started (by pid), workers first. Returns the pids signalled."""
    state_file = state_file or default_state_file()
    if not state_file.exists():
        return []
    state = json.loads(state_file.read_text())
    nodes = state.get("nodes", [])
    pids = [n["pid"] for n in reversed(nodes)]
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGTERM)
    deadline = time.time() + timeout
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.3)
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGKILL)   # its session: start_new_session made pid the group id
        except (ProcessLookupError, PermissionError):
            pass
    _forget_address(state.get("address"), state.get("temp_dir"))
    state_file.unlink(missing_ok=True)
    return pids


def _forget_address(address: str | None, temp_dir: str | None) -> None:
    """The head leaves its address in <temp_dir>/ray_current_cluster, where a bare `ray.init()`
    would find it and try to join a dead cluster; `ray stop` clears it, and so must `down`."""
    from ray._common.utils import get_ray_address_file
    f = Path(get_ray_address_file(temp_dir))
    try:
        if address and f.read_text().strip() == address:
            f.unlink()
    except OSError:
        pass


def _report() -> dict:
    import ray
    ctx = ray.get_runtime_context()
    return {**numa.binding_report(), "node_id": ctx.get_node_id(), "labels": ctx.get_node_labels()}


def status(address: str | None = None) -> list[dict]:
    """Runs a zero-CPU task on every alive node and returns its binding as seen from inside."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    own = not ray.is_initialized()
    if own:
        if auth_env() and not os.environ.get("RAY_AUTH_MODE"):
            from ray._private.authentication.authentication_token_setup import _enable_token_auth
            _enable_token_auth()   # sets RAY_AUTH_MODE=token and refreshes Ray's cached config
        ray.init(address=address or "auto", logging_level="error", log_to_driver=False)
    try:
        probe = ray.remote(num_cpus=0)(_report)
        nodes = [n for n in ray.nodes() if n["Alive"]]
        refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
                for n in nodes]
        out = []
        for n, rep in zip(nodes, ray.get(refs, timeout=120)):
            res = n["Resources"]
            out.append({"numa": (n.get("Labels") or {}).get("numa", rep["labels"].get("numa")),
                        "node_id": n["NodeID"][:12], "address": n["NodeManagerAddress"],
                        "num_cpus": res.get("CPU", 0), "num_gpus": res.get("GPU", 0),
                        "numa_node_resource": res.get("numa_node", 0), **{k: rep[k] for k in
                        ("pid", "cpus", "mempolicy", "cuda_visible_devices", "labels")}})
        return sorted(out, key=lambda r: str(r["numa"]))
    finally:
        if own:
            ray.shutdown()
