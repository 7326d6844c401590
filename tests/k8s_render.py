"""A small kustomize for the subset k8s/ uses, so tests render manifests without the binary.

Supported (anything else in a kustomization.yaml raises, so the renderer cannot silently differ
from `kubectl kustomize`):
- resources: files (multi-document YAML) and directories holding a kustomization.yaml;
- configMapGenerator with `files` (key = file name, or `key=path`), only with
  generatorOptions.disableNameSuffixHash: true (kustomize's hash suffix is not reproduced), and
  generatorOptions.labels;
- patches given by `path` or inline `patch`, holding a JSON6902 op list (RFC 6902 add, remove,
  replace, test), applied to the objects matched by `target` (group, version, kind, name).
tests/deploy/test_k8s.py compares this renderer with `kubectl kustomize` where kubectl is installed.
"""

import copy
from pathlib import Path

import yaml

KNOWN_KEYS = {"apiVersion", "kind", "resources", "configMapGenerator", "generatorOptions", "patches"}


def build(directory):
    """The objects `kubectl kustomize directory` prints (as dicts; order not reproduced)."""
    root = Path(directory)
    k = yaml.safe_load((root / "kustomization.yaml").read_text())
    unknown = set(k) - KNOWN_KEYS
    if unknown:
        raise NotImplementedError(f"{root}/kustomization.yaml: unsupported fields {sorted(unknown)}")
    objects = []
    for entry in k.get("resources", []):
        path = root / entry
        if path.is_dir():
            objects += build(path)
        else:
            objects += [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    objects += _config_maps(root, k.get("configMapGenerator", []), k.get("generatorOptions", {}))
    for patch in k.get("patches", []):
        ops = yaml.safe_load((root / patch["path"]).read_text()) if "path" in patch else yaml.safe_load(patch["patch"])
        if not isinstance(ops, list):
            raise NotImplementedError(f"{root}: only JSON6902 patches (op lists) are supported")
        matched = [o for o in objects if _matches(o, patch.get("target", {}))]
        if not matched:
            raise ValueError(f"{root}: patch {patch} matches no object")
        for obj in matched:
            patched = apply_json6902(obj, ops)
            obj.clear()
            obj.update(patched)
    return objects


def _config_maps(root, generators, options):
    unknown = set(options) - {"disableNameSuffixHash", "labels"}
    if generators and (unknown or not options.get("disableNameSuffixHash")):
        raise NotImplementedError("configMapGenerator needs generatorOptions.disableNameSuffixHash: true")
    maps = []
    for g in generators:
        if set(g) - {"name", "files"}:
            raise NotImplementedError(f"configMapGenerator: unsupported fields {sorted(set(g) - {'name', 'files'})}")
        data = {}
        for f in g.get("files", []):
            key, _, path = f.rpartition("=") if "=" in f else (Path(f).name, "", f)
            data[key] = (root / path).read_text()
        meta = {"name": g["name"]}
        if options.get("labels"):
            meta["labels"] = dict(options["labels"])
        maps.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data})
    return maps


def _matches(obj, target):
    group, _, version = obj["apiVersion"].rpartition("/")
    return all([
        target.get("group", group) == group,
        target.get("version", version) == version,
        target.get("kind", obj["kind"]) == obj["kind"],
        target.get("name", obj["metadata"]["name"]) == obj["metadata"]["name"],
    ])


def _pointer(path):
    if not path.startswith("/"):
        raise ValueError(f"JSON pointer must start with '/': {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _parent(doc, path):
    """(container, last token) for a JSON pointer; the container must exist."""
    *head, last = _pointer(path)
    node = doc
    for token in head:
        node = node[int(token)] if isinstance(node, list) else node[token]
    return node, last


def apply_json6902(doc, ops):
    """RFC 6902 add / remove / replace / test on a copy of doc."""
    doc = copy.deepcopy(doc)
    for op in ops:
        kind, path = op["op"], op["path"]
        node, last = _parent(doc, path)
        if isinstance(node, list):
            index = len(node) if (last == "-" and kind == "add") else int(last)
            if not 0 <= index <= len(node) - (kind != "add"):
                raise IndexError(f"{kind} {path}: index out of range")
        elif kind != "add" and last not in node:
            raise KeyError(f"{kind} {path}: no such member")
        if kind == "add":
            if isinstance(node, list):
                node.insert(index, copy.deepcopy(op["value"]))
            else:
                node[last] = copy.deepcopy(op["value"])
        elif kind == "replace":
            node[index if isinstance(node, list) else last] = copy.deepcopy(op["value"])
        elif kind == "remove":
            del node[index if isinstance(node, list) else last]
        elif kind == "test":
            if node[index if isinstance(node, list) else last] != op["value"]:
                raise ValueError(f"test {path}: {node[index if isinstance(node, list) else last]!r} != {op['value']!r}")
        else:
            raise NotImplementedError(f"JSON6902 op {kind!r}")
    return doc
