"""Framework-free MOONSHOT math: Fisher collection, objective combination, masks.

Nothing here imports LLM Compressor or Torch-Pruning; the adapters translate
their hosts' state into these tensor functions.
"""

from moonshot_plugins.core.fisher import (
    FISHER_MODES,
    FisherCollector,
    activation_checkpointing,
    causal_lm_sample_losses,
    chunked_causal_lm_sample_losses,
    frozen_parameters,
    layer_inputs,
    layer_output_grads,
    release_freed_memory,
    restore_weight,
    run_gradient_pass,
    standardized_weight,
    validate_fisher_mode,
)
from moonshot_plugins.core.objective import (
    AUTO,
    auto_taylor_weight,
    combine_diagonal,
    combine_hessians,
    mean_diagonal,
    row_objective_weights,
    token_objective_weights,
    validate_taylor_weight,
)
from moonshot_plugins.core.sparsify import moonshot_wanda_scores, row_wise_mask

__all__ = [
    "FISHER_MODES",
    "FisherCollector",
    "activation_checkpointing",
    "causal_lm_sample_losses",
    "chunked_causal_lm_sample_losses",
    "frozen_parameters",
    "layer_inputs",
    "layer_output_grads",
    "release_freed_memory",
    "restore_weight",
    "run_gradient_pass",
    "standardized_weight",
    "validate_fisher_mode",
    "AUTO",
    "auto_taylor_weight",
    "combine_diagonal",
    "combine_hessians",
    "mean_diagonal",
    "row_objective_weights",
    "token_objective_weights",
    "validate_taylor_weight",
    "moonshot_wanda_scores",
    "row_wise_mask",
]
