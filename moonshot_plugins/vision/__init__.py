"""MOONSHOT-SparseGPT for vision models (timm ViT, ResNet, EfficientNet): one call.

LLM Compressor's ``oneshot`` needs a Hugging Face ``PreTrainedModel`` (it
reads ``model.config`` and patches ``save_pretrained``) and a text processor,
and its SparseGPT allocates a Conv2d's Hessian for 1 x 1 kernels only. So
this adapter drives the host's own functions itself, block by block
(``accumulate_hessian``, ``sparsify_weight`` from
``llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify``), with the same
core as the modifiers: :class:`~moonshot_plugins.core.FisherCollector`'s
Fisher, :func:`~moonshot_plugins.core.combine_hessians`, and the same
``weight_update`` options. It adds no solver of its own.

- ``prune.py``: :func:`moonshot_prune`, argument checks, rollback on failure;
- ``layers.py``: which layers are pruned (grouped convolutions are skipped),
  and the blocks they are pruned in;
- ``sequential.py``: one block's Hessians and one layer's pruning;
- ``batchnorm.py``: :func:`recalibrate_batchnorm`, after pruning.
"""

from moonshot_plugins.vision.batchnorm import recalibrate_batchnorm
from moonshot_plugins.vision.prune import (
    CALIBRATION_LOSSES,
    DEFAULT_VISION_TAYLOR_WEIGHT,
    VisionPruneResult,
    moonshot_prune,
)

__all__ = [
    "CALIBRATION_LOSSES",
    "DEFAULT_VISION_TAYLOR_WEIGHT",
    "VisionPruneResult",
    "moonshot_prune",
    "recalibrate_batchnorm",
]
