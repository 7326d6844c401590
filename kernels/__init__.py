"""Triton kernels of RetroInfer, each beside its plain-torch reference (``*_ref``).

Every public function runs its Triton kernel on CUDA tensors (or under the Triton CPU interpreter
when ``RETROINFER_TRITON_INTERPRET=1`` / ``TRITON_INTERPRET=1``), else its reference; ``use_triton``
says which a call takes. Triton is optional: without it every function is its reference.

This face exports what the engine (``retroinfer/``) and the tests call, by the layer that calls it:

* shape arithmetic on the host: ``cdiv``, ``next_pow2`` (also the engine's CUDA-graph buckets);
* decoder layer: ``add_rms_norm``, ``rms_norm``, ``apply_rope``, ``silu_mul``;
* wave index build: ``spherical_kmeans`` (and its steps ``kmeans_assign``, ``kmeans_update``,
  ``kmeans_centroids``), ``cluster_order``, ``cluster_reorder``;
* full attention: ``paged_decode``;
* wave decode step: ``step_inputs``, ``centroid_logits`` (+ ``centroid_probs`` = ``centroid_scores``),
  ``select_zones_logits`` (``select_zones`` on finished scores), ``cache_plan``,
  ``gather_clusters_cached`` / ``gather_clusters_batched`` / ``cluster_rows`` (``gather_clusters``
  for one row), ``weighted_decode``, ``estimate_decode``, ``merge_partials`` (``merge_states``).

A module and the function of the same name (``cache_plan``, ``centroid_scores``, ``paged_decode``,
``step_inputs``, ``weighted_decode``): the package attribute is the function; reach the module's
``TUNE`` with ``from retroinfer.kernels.cache_plan import TUNE`` or ``importlib.import_module``.

This folder is ``retroinfer.kernels`` only. Where the repository root is on ``sys.path`` (``python
-m ...`` or ``serve run`` in a checkout, and the Ray workers they start), ``import kernels`` finds it
as a top-level package and would shadow the PyPI package ``kernels``, which transformers imports
(when it is installed) as it loads a tokenizer or a model; imported under that name, this module
hands the name over to that package (see the end of the file).
"""

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

from ._triton_util import cdiv, next_pow2, use_triton
from .cache_plan import cache_plan, cache_plan_ref
from .centroid_scores import centroid_logits, centroid_probs, centroid_scores, centroid_scores_ref
from .cluster_layout import cluster_order, cluster_reorder, cluster_reorder_ref
from .gather import (cluster_rows, cluster_rows_ref, gather_clusters, gather_clusters_batched, gather_clusters_cached,
                     gather_clusters_cached_ref, gather_clusters_ref)
from .kmeans import (kmeans_assign, kmeans_assign_ref, kmeans_centroids, kmeans_centroids_ref, kmeans_update,
                     kmeans_update_ref, spherical_kmeans, spherical_kmeans_ref)
from .paged_decode import paged_decode, paged_decode_ref
from .rmsnorm import add_rms_norm, add_rms_norm_ref, rms_norm
from .rope import apply_rope, apply_rope_ref, rope_ref
from .select import select_zones, select_zones_logits, select_zones_ref
from .split_reduce import merge_partials, merge_partials_ref
from .step_inputs import step_inputs, step_inputs_ref
from .swiglu import silu_mul, silu_mul_ref
from .weighted_decode import (estimate_decode, estimate_decode_ref, merge_states, weighted_decode,
                              weighted_decode_ref)

__all__ = [
    "use_triton", "cdiv", "next_pow2",
    "add_rms_norm", "add_rms_norm_ref", "rms_norm",
    "apply_rope", "apply_rope_ref", "rope_ref",
    "silu_mul", "silu_mul_ref",
    "kmeans_assign", "kmeans_assign_ref", "kmeans_centroids", "kmeans_centroids_ref", "kmeans_update",
    "kmeans_update_ref", "spherical_kmeans", "spherical_kmeans_ref",
    "cluster_order", "cluster_reorder", "cluster_reorder_ref",
    "paged_decode", "paged_decode_ref",
    "step_inputs", "step_inputs_ref",
    "centroid_logits", "centroid_probs", "centroid_scores", "centroid_scores_ref",
    "select_zones", "select_zones_logits", "select_zones_ref",
    "cache_plan", "cache_plan_ref",
    "cluster_rows", "cluster_rows_ref", "gather_clusters", "gather_clusters_batched", "gather_clusters_cached",
    "gather_clusters_cached_ref", "gather_clusters_ref",
    "estimate_decode", "estimate_decode_ref", "weighted_decode", "weighted_decode_ref",
    "merge_partials", "merge_partials_ref", "merge_states",
]


def _hand_over_the_name() -> None:
    """Imported as top-level ``kernels``: put the PyPI package of that name, found on the rest of
    the path, in ``sys.modules`` (an import returns what ``sys.modules`` holds once the module has
    run), and forget this folder's modules under that name."""
    checkout = Path(__file__).resolve().parents[1]
    spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if Path(p or ".").resolve() != checkout])
    if spec is None:            # no such package installed: nothing to shadow
        return
    for name in [n for n in sys.modules if n.startswith("kernels.")]:
        del sys.modules[name]
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module
    spec.loader.exec_module(module)


if __name__ == "kernels":
    _hand_over_the_name()
