"""MoonshotWandaModifier: LLM Compressor's Wanda on the MOONSHOT objective."""

from __future__ import annotations

import torch
from compressed_tensors.utils import align_module_device, update_offload_parameter
from loguru import logger

from llmcompressor.modifiers.pruning.wanda import WandaPruningModifier
from llmcompressor.utils.metric_logging import CompressionLogger

from moonshot_plugins.core import (
    combine_diagonal,
    moonshot_wanda_scores,
    release_freed_memory,
    restore_weight,
    row_wise_mask,
    standardized_weight,
)
from moonshot_plugins.llmcompressor.mixin import MoonshotModifierMixin

__all__ = ["MoonshotWandaModifier"]


class MoonshotWandaModifier(MoonshotModifierMixin, WandaPruningModifier):
    """Wanda on the MOONSHOT objective: score W_ij^2 * S_ij with
    S_ij = (1-lam) ||X_j||^2/n + lam (s_r / s_F) F_ij, F the per-weight
    diagonal empirical Fisher (token or sample mode, from the gradient pass)
    and s the mean. Wanda's own rule (lowest scores per output row, N:M or
    unstructured) selects the mask.

    Sample yaml:

    ```yaml
    sparsity_stage:
      sparsity_modifiers:
        MoonshotWandaModifier:
          sparsity: 0.5
          mask_structure: "2:4"
          taylor_weight: 0.5
          targets: ["Linear"]
          ignore: ["re:.*lm_head"]
    ```

    All ``WandaPruningModifier`` fields apply, plus the MOONSHOT fields of
    :class:`~moonshot_plugins.llmcompressor.mixin.MoonshotModifierMixin`.
    """

    def _fisher_statistic(self) -> str:
        return "diagonal"

    def compress_modules(self):
        """Prune every calibrated layer on the combined per-weight curvature
        (the host's own ``compress_modules`` when lam == 0)."""
        self._check_finite_host_statistics(self._row_scalars, "input norms")
        if self.taylor_weight == 0.0:
            return super().compress_modules()
        for module in list(self._num_samples):
            name = self._module_names[module]
            logger.info(f"Sparsifying {name} using {self._num_samples[module]} samples")
            statistics = self._layer_statistics.pop(module)
            with torch.no_grad(), align_module_device(module), CompressionLogger(module):
                curvature = combine_diagonal(
                    self._row_scalars.pop(module), statistics.fisher, statistics.taylor_weight
                )
                del statistics  # frees the layer's Fisher before the scores are built
                weight = standardized_weight(module).to(curvature.dtype)
                mask = row_wise_mask(
                    moonshot_wanda_scores(weight, curvature),
                    self._module_sparsities[module],
                    self._prune_n,
                    self._prune_m,
                )
                weight[mask] = 0.0
                pruned = restore_weight(module, weight)
            update_offload_parameter(module, "weight", pruned)
            del self._num_samples[module]
        release_freed_memory()  # as in MoonshotSparseGPTModifier.compress_modules
