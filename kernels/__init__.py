"""Triton kernels of RetroInfer, each beside its plain-torch reference (``*_ref``).

Every public function runs its Triton kernel on CUDA tensors (or under the Triton CPU interpreter
when ``RETROINFER_TRITON_INTERPRET=1`` / ``TRITON_INTERPRET=1``), else its reference. Triton is
optional: without it every function is its reference.
"""

from .centroid_scores import centroid_scores, centroid_scores_ref
from .cluster_layout import ClusterLayout, cluster_order, cluster_reorder, cluster_reorder_ref
from .gather import cluster_rows, cluster_rows_ref, gather_clusters, gather_clusters_ref
from .kmeans import (kmeans_assign, kmeans_assign_ref, kmeans_centroids, kmeans_centroids_ref, kmeans_update,
                     kmeans_update_ref, spherical_kmeans, spherical_kmeans_ref)
from .paged_decode import paged_decode, paged_decode_ref
from .rmsnorm import add_rms_norm, add_rms_norm_ref, rms_norm, rms_norm_ref
from .rope import apply_rope, apply_rope_ref, rope_ref
from .select import select_zones, select_zones_ref
from .swiglu import silu_mul, silu_mul_ref
from .weighted_decode import (estimate_decode, estimate_decode_ref, merge_states, weighted_decode,
                              weighted_decode_ref)

__all__ = [
    "centroid_scores", "centroid_scores_ref",
    "ClusterLayout", "cluster_order", "cluster_reorder", "cluster_reorder_ref",
    "cluster_rows", "cluster_rows_ref", "gather_clusters", "gather_clusters_ref",
    "kmeans_assign", "kmeans_assign_ref", "kmeans_centroids", "kmeans_centroids_ref", "kmeans_update",
    "kmeans_update_ref", "spherical_kmeans", "spherical_kmeans_ref",
    "paged_decode", "paged_decode_ref",
    "add_rms_norm", "add_rms_norm_ref", "rms_norm", "rms_norm_ref",
    "apply_rope", "apply_rope_ref", "rope_ref",
    "select_zones", "select_zones_ref",
    "silu_mul", "silu_mul_ref",
    "estimate_decode", "estimate_decode_ref", "merge_states", "weighted_decode", "weighted_decode_ref",
]
