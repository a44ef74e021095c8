"""The measurements by name: each case takes a dict of parameters and returns a dict of figures.

``benchmarks.run`` runs every case in a fresh subprocess (so peak memory,
threads, allocator and device count are those of that case alone), or all in
one process for ``--smoke``. The harness (timing, resources, the JAX setup) is
``benchmarks.harness``; the cases live by family in ``cases_train``, ``cases_torch``
and ``cases_map``; the per-op profile in ``benchmarks.op_profile``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from benchmarks import cases_map, cases_torch, cases_train, op_profile

CASES: dict[str, Callable[[Mapping[str, Any]], dict[str, Any]]] = {
    "info": cases_train.case_info,
    "matmul_peak": cases_train.case_matmul_peak,
    "weights": cases_train.case_weights,
    "jax_train": cases_train.case_jax_train,
    "jax_epoch": cases_train.case_jax_epoch,
    "jax_profile": op_profile.case_jax_profile,
    "torch_train": cases_torch.case_torch_train,
    "embed": cases_map.case_embed,
    "map_compare": cases_map.case_map_compare,
    "map_scaling": cases_map.case_map_scaling,
}
