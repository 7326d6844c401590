"""Validate Kubernetes objects against the KubeRay CRDs' OpenAPI schemas, as the API server does.

The CRDs (KubeRay v1.7.0) come from ../shared/kuberay-crds beside the repo checkout, or from
$RETROINFER_KUBERAY_CRDS; without them the callers skip. Beyond the schema: the metadata.name limits
and the parts of KubeRay's own ValidateRayClusterSpec (ray-operator/controllers/ray/utils/
validation.go) that k8s/ touches.
"""

import functools
import json
import os
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MAX_NAME = {"RayService": 47, "RayJob": 47, "RayCluster": 53}  # KubeRay utils/constant.go
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def crd_dir():
    d = Path(os.environ.get("RETROINFER_KUBERAY_CRDS") or ROOT.parent / "shared" / "kuberay-crds")
    if not d.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {d} (set RETROINFER_KUBERAY_CRDS)")
    return d


def _k8s_schema(s):
    """OpenAPI v3 (structural CRD schema) -> JSON Schema, as the API server + kubectl apply judge it:
    int-or-string, nullable, and unknown fields rejected (kubectl's default strict field validation)."""
    s = dict(s)
    if s.get("x-kubernetes-int-or-string") and "anyOf" not in s:
        s["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if s.get("nullable") and isinstance(s.get("type"), str):
        s["type"] = [s["type"], "null"]
    if "properties" in s:
        s["properties"] = {k: _k8s_schema(v) for k, v in s["properties"].items()}
        if "additionalProperties" not in s and not s.get("x-kubernetes-preserve-unknown-fields"):
            s["additionalProperties"] = False
    if isinstance(s.get("additionalProperties"), dict):
        s["additionalProperties"] = _k8s_schema(s["additionalProperties"])
    if "items" in s:
        s["items"] = _k8s_schema(s["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in s:
            s[key] = [_k8s_schema(x) for x in s[key]]
    return s


def _list_type(validator, value, instance, schema):
    """x-kubernetes-list-type: map lists have unique keys, set lists unique items."""
    if not validator.is_type(instance, "array"):
        return
    keys = schema.get("x-kubernetes-list-map-keys", []) if value == "map" else None
    seen = set()
    for item in instance:
        key = json.dumps([item.get(k) for k in keys] if keys is not None else item, sort_keys=True)
        if value in ("map", "set") and key in seen:
            yield jsonschema.ValidationError(f"duplicate {value}-list entry {key}")
        seen.add(key)


K8sValidator = jsonschema.validators.extend(jsonschema.Draft7Validator, {"x-kubernetes-list-type": _list_type})


@functools.lru_cache(maxsize=None)
def crd_validator(kind, api_version):
    group, version = api_version.split("/")
    for f in sorted(crd_dir().glob("*.yaml")):
        crd = yaml.load(f.read_text(), Loader=Loader)
        if crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind:
            (v,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
            return K8sValidator(_k8s_schema(v["schema"]["openAPIV3Schema"]))
    raise LookupError(f"no CRD for {kind} {api_version} in {crd_dir()}")


def crd_errors(obj):
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in crd_validator(obj["kind"], obj["apiVersion"]).iter_errors(obj)]
    name = obj["metadata"]["name"]
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) or len(name) > MAX_NAME[obj["kind"]]:
        errors.append(f"metadata.name {name!r}: KubeRay wants a DNS-1035 label of <= {MAX_NAME[obj['kind']]} chars")
    return errors


def kuberay_errors(cluster_spec):
    """The parts of KubeRay's ValidateRayClusterSpec (utils/validation.go) these manifests touch."""
    errors = []
    named = [("head", cluster_spec["headGroupSpec"])] + [(g["groupName"], g) for g in cluster_spec.get("workerGroupSpecs", [])]
    for name, g in named:
        params = g.get("rayStartParams", {})
        if "labels" in params:
            errors.append(f"{name}: rayStartParams['labels'] is rejected; use the group's labels field")
        if g.get("resources") and any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")):
            errors.append(f"{name}: resources set both in rayStartParams and in the resources field")
        if name != "head" and not cluster_spec.get("enableInTreeAutoscaling"):
            if not g.get("minReplicas", 0) <= g.get("replicas", 0) <= g.get("maxReplicas", 0):
                errors.append(f"{name}: needs minReplicas <= replicas <= maxReplicas")
    return errors
