"""MOONSHOT as a Torch-Pruning importance criterion.

``MoonshotImportance`` implements Torch-Pruning's ``Importance`` contract and
plugs into ``tp.pruner.MetaPruner(..., importance=MoonshotImportance(...))``.
The math lives in :mod:`moonshot_plugins.core`; this adapter only maps
Torch-Pruning groups onto it.
"""

from moonshot_plugins.torch_pruning.importance import (
    RECON_SCALES,
    MoonshotImportance,
    classification_sample_losses,
)
from moonshot_plugins.torch_pruning.timm_vit import sync_vit_heads, vit_num_heads

__all__ = [
    "MoonshotImportance",
    "RECON_SCALES",
    "classification_sample_losses",
    "sync_vit_heads",
    "vit_num_heads",
]
