"""Framework-free MOONSHOT math: Fisher collection, objective combination, masks.

Nothing here imports LLM Compressor or Torch-Pruning; the adapters translate
their hosts' state into these tensor functions.

* :mod:`~moonshot_plugins.core.layers`: supported layers and their weights,
  inputs and output gradients in the standardised (d_out, d_in) orientation
* :mod:`~moonshot_plugins.core.collector`: :class:`FisherCollector`, the
  hooks that accumulate the empirical Fisher statistics
* :mod:`~moonshot_plugins.core.token_statistics`: the token Fisher kept as
  per-position weights
* :mod:`~moonshot_plugins.core.norm_fisher`: the Fisher of a norm layer's gamma
* :mod:`~moonshot_plugins.core.losses`: per-sample losses
* :mod:`~moonshot_plugins.core.gradient_pass`: the forward/backward driver
* :mod:`~moonshot_plugins.core.blockwise_pass`: the same pass one block on
  the execution device at a time, for models larger than the accelerator
* :mod:`~moonshot_plugins.core.finite`: NaN/inf checks that stop a run before
  any weight changes
* :mod:`~moonshot_plugins.core.objective`: combining reconstruction and Taylor
* :mod:`~moonshot_plugins.core.sparsify`: masks of per-weight score hosts
* :mod:`~moonshot_plugins.core.curvature`, :mod:`~moonshot_plugins.core.resolve`,
  :mod:`~moonshot_plugins.core.admm`, :mod:`~moonshot_plugins.core.row_fisher`:
  the layer objective and its solvers (re-solve on a mask, ADMM mask search,
  per-row Fisher factors)
* :mod:`~moonshot_plugins.core.precision`: the gradient pass's dtype
* :mod:`~moonshot_plugins.core.channel_scores`: per-channel scores of
  structured pruning
"""

from moonshot_plugins.core.admm import ADMM_RHO, AdmmResult, admm_prune, keep_largest
from moonshot_plugins.core.channel_scores import (
    OBJECTIVE_SCALES,
    RECON_SCALES,
    depthwise_channel_errors,
    input_channel_errors,
    mixed_channel_scores,
    obd_input_channel_scores,
    obd_norm_channel_scores,
    obd_output_channel_scores,
    output_channel_errors,
    pooled_mean,
    relative_errors,
)
from moonshot_plugins.core.curvature import (
    LayerCurvature,
    ObjectiveTerms,
    diagonal_fisher_curvature,
    layer_curvature,
    layer_objective,
    row_fisher_curvature,
)
from moonshot_plugins.core.blockwise_pass import (
    blocks_bypassed,
    first_block_call,
    run_blockwise_gradient_pass,
)
from moonshot_plugins.core.collector import FISHER_MODES, FisherCollector, validate_fisher_mode
from moonshot_plugins.core.finite import NonFiniteError, check_finite_parameters, describe_non_finite
from moonshot_plugins.core.gradient_pass import (
    activation_checkpointing,
    frozen_parameters,
    release_freed_memory,
    run_gradient_pass,
)
from moonshot_plugins.core.layers import (
    has_affine_weight,
    in_features,
    is_depthwise_conv,
    is_norm_layer,
    layer_inputs,
    layer_output_grads,
    module_bytes,
    restore_weight,
    standardized_weight,
)
from moonshot_plugins.core.losses import (
    causal_lm_sample_losses,
    chunked_causal_lm_sample_losses,
    classification_sample_losses,
    predicted_label_sample_losses,
)
from moonshot_plugins.core.objective import (
    AUTO,
    ZERO_FISHER_TAYLOR_ONLY,
    auto_taylor_weight,
    auto_taylor_weight_from_moments,
    combine_diagonal,
    combine_hessians,
    mean_diagonal,
    row_objective_weights,
    token_objective_weights,
    token_weight_moments,
    validate_taylor_weight,
)
from moonshot_plugins.core.precision import (
    AUTO_DTYPE,
    GRADIENT_DTYPES,
    bfloat16_is_native,
    resolve_gradient_dtype,
    validate_gradient_dtype,
)
from moonshot_plugins.core.resolve import SolveResult, batched_pcg, resolve_on_mask
from moonshot_plugins.core.row_fisher import RowFisherBuilder, row_fisher_matvec
from moonshot_plugins.core.sparsify import moonshot_wanda_scores, row_wise_mask

__all__ = [
    "ADMM_RHO",
    "AdmmResult",
    "admm_prune",
    "keep_largest",
    "LayerCurvature",
    "diagonal_fisher_curvature",
    "ObjectiveTerms",
    "layer_curvature",
    "layer_objective",
    "row_fisher_curvature",
    "SolveResult",
    "batched_pcg",
    "resolve_on_mask",
    "RowFisherBuilder",
    "row_fisher_matvec",
    "FISHER_MODES",
    "FisherCollector",
    "validate_fisher_mode",
    "NonFiniteError",
    "check_finite_parameters",
    "describe_non_finite",
    "activation_checkpointing",
    "frozen_parameters",
    "release_freed_memory",
    "run_gradient_pass",
    "blocks_bypassed",
    "first_block_call",
    "run_blockwise_gradient_pass",
    "has_affine_weight",
    "in_features",
    "is_depthwise_conv",
    "is_norm_layer",
    "layer_inputs",
    "layer_output_grads",
    "module_bytes",
    "restore_weight",
    "standardized_weight",
    "causal_lm_sample_losses",
    "chunked_causal_lm_sample_losses",
    "classification_sample_losses",
    "predicted_label_sample_losses",
    "AUTO_DTYPE",
    "GRADIENT_DTYPES",
    "bfloat16_is_native",
    "resolve_gradient_dtype",
    "validate_gradient_dtype",
    "AUTO",
    "auto_taylor_weight",
    "auto_taylor_weight_from_moments",
    "combine_diagonal",
    "combine_hessians",
    "mean_diagonal",
    "row_objective_weights",
    "token_objective_weights",
    "token_weight_moments",
    "validate_taylor_weight",
    "ZERO_FISHER_TAYLOR_ONLY",
    "moonshot_wanda_scores",
    "row_wise_mask",
    "OBJECTIVE_SCALES",
    "RECON_SCALES",
    "depthwise_channel_errors",
    "input_channel_errors",
    "mixed_channel_scores",
    "obd_input_channel_scores",
    "obd_norm_channel_scores",
    "obd_output_channel_scores",
    "output_channel_errors",
    "pooled_mean",
    "relative_errors",
]
