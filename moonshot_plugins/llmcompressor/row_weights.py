"""Per-row objective weights around SparseGPT's row-shared solver (``row_weights``).

Row i of a layer is scaled by sqrt(m_i) (:func:`moonshot_plugins.core.row_objective_weights`)
before the host's solver runs and scaled back after, so an unstructured mask
trades weights across rows by m_i while each row's own solve is unchanged.
"""

from __future__ import annotations

from typing import Iterable

import torch
from compressed_tensors.utils import align_module_device, update_offload_parameter

from moonshot_plugins.core import restore_weight, row_objective_weights, standardized_weight
from moonshot_plugins.llmcompressor.gradient_pass import LayerTaylorStatistics

__all__ = ["scale_rows", "unscale_rows"]


def scale_rows(
    modules: Iterable[torch.nn.Module],
    statistics: dict[torch.nn.Module, LayerTaylorStatistics],
) -> dict[torch.nn.Module, torch.Tensor]:
    """Multiply each row of ``modules`` that has row sensitivities by sqrt(m_i),
    m_i from the layer's sensitivities and lam.

    :return: per scaled layer, the factors sqrt(m), (d_out,), for :func:`unscale_rows`
    """
    roots = {}
    for module in modules:
        record = statistics.get(module)
        if record is None or record.row_sensitivities is None:
            continue
        with torch.no_grad(), align_module_device(module):
            weight = standardized_weight(module)
            root = (
                row_objective_weights(record.row_sensitivities, record.taylor_weight)
                .sqrt()
                .to(weight.device, weight.dtype)
            )
        _set_weight(module, weight * root.unsqueeze(1))
        roots[module] = root
    return roots


def unscale_rows(roots: dict[torch.nn.Module, torch.Tensor]) -> None:
    """Undo :func:`scale_rows` on the (now pruned) weights: divide row i by sqrt(m_i)."""
    for module, root in roots.items():
        _set_weight(module, standardized_weight(module) / root.unsqueeze(1))


def _set_weight(module: torch.nn.Module, weight: torch.Tensor) -> None:
    """Write a (d_out, d_in) weight back in the layer's own layout (offload-aware)."""
    with torch.no_grad():
        update_offload_parameter(module, "weight", restore_weight(module, weight))
