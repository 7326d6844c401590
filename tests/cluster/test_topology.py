"""NUMA topology from a fake sysfs, simulated nodes, the memory-policy wrapper, and the launcher's
commands (no Ray started here)."""
import json
import os
import subprocess
import sys

import pytest

from retroinfer import numa
from retroinfer.cluster.host import launcher
from retroinfer.cluster.host.topology import NumaNode, Topology, discover, simulate
from retroinfer.numa import format_cpulist, parse_cpulist


def _fake_sysfs(root, nodes: dict[int, str], gpus: list[tuple[str, int]], others=()):
    for nid, cpus in nodes.items():
        d = root / f"devices/system/node/node{nid}"
        d.mkdir(parents=True)
        (d / "cpulist").write_text(cpus + "\n")
        (d / "meminfo").write_text(f"Node {nid} MemTotal:       {(nid + 1) * 1048576} kB\n"
                                   f"Node {nid} MemFree:        {524288} kB\n")
    for bus, node in gpus:
        _pci(root, bus, "0x10de", "0x030200", node)
    for bus, vendor, cls, node in others:
        _pci(root, bus, vendor, cls, node)
    return root


def _pci(root, bus, vendor, cls, node):
    d = root / "bus/pci/devices" / bus
    d.mkdir(parents=True)
    (d / "vendor").write_text(vendor + "\n")
    (d / "class").write_text(cls + "\n")
    (d / "numa_node").write_text(f"{node}\n")


def test_cpulist_round_trip():
    assert parse_cpulist("0-3,8,10-11\n") == (0, 1, 2, 3, 8, 10, 11)
    assert format_cpulist([11, 0, 1, 2, 3, 8, 10]) == "0-3,8,10-11"
    assert parse_cpulist("") == ()


def test_two_socket_host_with_gpus(tmp_path):
    root = _fake_sysfs(tmp_path, {0: "0-3,8-11", 1: "4-7,12-15", 2: ""},
                       gpus=[("0000:18:00.0", 0), ("0000:9a:00.0", 1), ("0000:17:00.0", 0), ("0000:ab:00.0", -1)],
                       others=[("0000:05:00.0", "0x10de", "0x068000", 0),      # NVSwitch: not a GPU
                               ("0000:06:00.0", "0x8086", "0x030000", 1)])     # not NVIDIA
    topo = discover(root, use_nvidia_smi=False)
    assert [n.id for n in topo.nodes] == [0, 1]                                  # CPU-less node 2 skipped
    n0, n1 = topo.nodes
    assert n0.cpus == (0, 1, 2, 3, 8, 9, 10, 11) and n1.cpus == (4, 5, 6, 7, 12, 13, 14, 15)
    assert n0.mem_total_bytes == 2**30 and n1.mem_total_bytes == 2 * 2**30 and n0.mem_free_bytes == 2**29
    # PCI bus order gives CUDA indices: 17 -> 0, 18 -> 1, 9a -> 2, ab -> 3; numa_node -1 counts as 0
    assert n0.gpu_indices == [0, 1, 3] and n1.gpu_indices == [2]
    assert "no CPUs" in topo.notes[0]
    assert json.loads(json.dumps(topo.to_dict()))["nodes"][1]["cpus"] == "4-7,12-15"


def test_simulate_splits_cpus_memory_and_gpus(tmp_path):
    root = _fake_sysfs(tmp_path, {0: "0-7"}, gpus=[("0000:17:00.0", 0), ("0000:18:00.0", 0)])
    sim = simulate(discover(root, use_nvidia_smi=False), 2)
    assert sim.simulated and [n.cpus for n in sim.nodes] == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert [n.gpu_indices for n in sim.nodes] == [[0], [1]]
    assert [n.simulated_from for n in sim.nodes] == [0, 0]
    assert sim.nodes[0].mem_total_bytes == 2**29
    with pytest.raises(ValueError):
        simulate(sim, 8)


def test_this_machine_is_discovered():
    topo = discover()
    assert topo.nodes and all(n.cpus for n in topo.nodes)


def test_mempolicy_wrapper_in_a_child_process():
    code = ("from retroinfer import numa; import json; out = {'avail': numa.numa_available(), "
            "'before': numa.get_mempolicy(), 'set': numa.set_membind([0]), 'after': numa.get_mempolicy()}; "
            "numa.set_mempolicy(numa.MPOL_DEFAULT); out['reset'] = numa.get_mempolicy(); print(json.dumps(out))")
    out = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    if out["before"] is None:
        pytest.skip("get_mempolicy is not available here (container seccomp or non-Linux)")
    assert out["set"] and out["after"] == ["bind", [0]] and out["reset"] == ["default", []]
    rep = numa.binding_report()
    assert set(rep) >= {"pid", "cpus", "mempolicy", "cuda_visible_devices"}


def test_launcher_plan_binds_every_node():
    topo = Topology((NumaNode(0, (0, 1), 8 << 30, 0, ()), NumaNode(1, (2, 3), 8 << 30, 0, ())))
    plans = launcher.plan(topo, host="10.0.0.1", port=6500, use_numactl=False)
    head, worker = plans
    assert head.head and not worker.head and head.binder == worker.binder == "preexec"
    a0, a1 = head.argv, worker.argv
    assert a0[:3] == ["ray", "start", "--block"] and "--head" in a0 and a0[a0.index("--port") + 1] == "6500"
    assert a1[a1.index("--address") + 1] == "10.0.0.1:6500"
    assert json.loads(a1[a1.index("--resources") + 1]) == {"numa_node": 1, "numa_node_1": 1}
    assert a1[a1.index("--labels") + 1] == "numa=1" and a1[a1.index("--num-cpus") + 1] == "2"
    assert head.env["CUDA_VISIBLE_DEVICES"] == "" and head.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert worker.cpus == [2, 3] and worker.mem_nodes == [1]
    assert set(range(20000, 22000)) >= {int(a0[a0.index("--min-worker-port") + 1]),
                                        int(a1[a1.index("--max-worker-port") + 1])}


def test_launcher_plan_ports_are_distinct(monkeypatch):
    """The OS may hand out a just-probed port again: the plan never gives one port twice, nor the
    head's port or a worker-range port (a head once failed to start with two daemons on one port)."""
    topo = Topology((NumaNode(0, (0, 1), 8 << 30, 0, ()), NumaNode(1, (2, 3), 8 << 30, 0, ())))
    probes = iter([6500, 40001, 40001, 20005, 40002] + list(range(41000, 41100)))
    monkeypatch.setattr(launcher, "free_port", lambda: next(probes))
    plans = launcher.plan(topo, host="10.0.0.1", port=6500, use_numactl=False)
    ports = [int(p.argv[i + 1]) for p in plans for i, a in enumerate(p.argv)
             if a.endswith("-port") and a not in ("--port", "--min-worker-port", "--max-worker-port")]
    assert len(ports) == 13 and len(set(ports)) == len(ports)
    assert 6500 not in ports and not any(20000 <= x < 22000 for x in ports)


def test_launcher_uses_numactl_when_present(monkeypatch):
    monkeypatch.setattr(launcher.shutil, "which", lambda name: "/usr/bin/numactl" if name == "numactl" else None)
    real = simulate(discover(), 1)          # simulated: bind to the fake node's CPUs, real node's memory
    p = launcher.plan(real, host="127.0.0.1", port=6501)[0]
    assert p.binder == "numactl" and p.argv[0] == "/usr/bin/numactl"
    assert p.argv[1].startswith("--physcpubind=") and p.argv[2] == "--membind=0"


def test_cli_dry_run_prints_the_commands():
    out = subprocess.run(["retroinfer", "cluster", "up", "--dry-run", "--port", "6502", "--host", "127.0.0.1"],
                         capture_output=True, text=True, check=True).stdout
    assert "ray start --block" in out and "numa=0" in out and "--head" in out


def test_preexec_binding_reaches_a_child(tmp_path):
    """What `up` does without numactl: affinity + membind in preexec_fn, inherited by children."""
    cpu = sorted(os.sched_getaffinity(0))[-1]
    code = ("import os, json; from retroinfer import numa; "
            "print(json.dumps([sorted(os.sched_getaffinity(0)), numa.get_mempolicy()]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         preexec_fn=lambda: numa.bind_process([cpu], [0])).stdout
    cpus, pol = json.loads(out)
    assert cpus == [cpu]
    if pol is not None:
        assert pol == ["bind", [0]]
