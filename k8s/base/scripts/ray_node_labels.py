"""Write the Ray node labels of this pod to a YAML file for `ray start --labels-file`.

On Kubernetes the NUMA node of a worker pod is chosen by the kubelet (static CPU manager, Static
memory manager, single-numa-node topology manager), so the label numa=<N> that the bare-metal
launcher passes to each raylet can only be computed inside the pod, before `ray start`:

  numa          the NUMA node holding all of this process's allowed CPUs, or "none" when they
                span several nodes, or "unknown" when the binding cannot be read
  numa-aligned  "true" when the allowed CPUs, the allowed memory nodes and every visible GPU are on
                that one node; "false" otherwise; "unknown" when it cannot be told

Standard library only. It always writes the file and exits 0: a missing label must not stop Ray.
Usage: python3 ray_node_labels.py OUT.yaml [--root /] [--gpu-bus-ids auto|none|ID,ID,...]
"""

import argparse
import json
import os
import subprocess
import sys


def parse_list(text):
    """'0-3,8,10-11' -> {0, 1, 2, 3, 8, 10, 11} (the kernel's cpulist / nodelist format)."""
    out = set()
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def allowed(root):
    """(CPUs, memory nodes) this process may use, from /proc/self/status (cpusets applied)."""
    fields = {}
    with open(os.path.join(root, "proc/self/status")) as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value
    return parse_list(fields["Cpus_allowed_list"]), parse_list(fields["Mems_allowed_list"])


def node_cpus(root):
    """{node: CPUs} from /sys/devices/system/node/node*/cpulist."""
    base = os.path.join(root, "sys/devices/system/node")
    nodes = {}
    for name in os.listdir(base):
        if name.startswith("node") and name[4:].isdigit():
            with open(os.path.join(base, name, "cpulist")) as f:
                nodes[int(name[4:])] = parse_list(f.read())
    return nodes


def gpu_bus_ids(spec):
    """PCI bus ids of the GPUs this container sees ('auto' asks nvidia-smi; None = unknown)."""
    if spec == "none":
        return []
    if spec != "auto":
        return [b for b in spec.split(",") if b]
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=pci.bus_id", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [line.strip() for line in out.splitlines() if line.strip()]


def gpu_node(root, bus_id):
    """NUMA node of a GPU; nvidia-smi's '00000000:18:00.0' is sysfs's '0000:18:00.0'."""
    domain, _, rest = bus_id.strip().lower().partition(":")
    with open(os.path.join(root, "sys/bus/pci/devices", f"{domain[-4:]}:{rest}", "numa_node")) as f:
        return int(f.read())


def labels(root, gpu_spec):
    cpus, mems = allowed(root)
    nodes = {n for n, node_cpu_set in node_cpus(root).items() if cpus & node_cpu_set}
    if len(nodes) != 1:
        return {"numa": "none" if nodes else "unknown", "numa-aligned": "false" if nodes else "unknown"}
    (node,) = nodes
    buses = gpu_bus_ids(gpu_spec)
    if buses is None:
        aligned = "unknown"
    else:
        gpus_local = all(gpu_node(root, b) in (node, -1) for b in buses)
        aligned = "true" if mems == {node} and gpus_local else "false"
    return {"numa": str(node), "numa-aligned": aligned}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--root", default="/", help="filesystem root holding proc/ and sys/ (tests)")
    p.add_argument("--gpu-bus-ids", default="auto")
    args = p.parse_args(argv)
    try:
        result = labels(args.root, args.gpu_bus_ids)
    except Exception as e:  # never block `ray start` on a label
        print(f"ray_node_labels: cannot read the NUMA binding: {e!r}", file=sys.stderr)
        result = {"numa": "unknown", "numa-aligned": "unknown"}
    with open(args.out, "w") as f:
        json.dump(result, f)  # JSON is YAML; every value is a string, as Ray requires
        f.write("\n")
    print(f"ray node labels: {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
