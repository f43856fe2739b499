"""timm ViT bookkeeping around Torch-Pruning's head pruning.

``MetaPruner(num_heads=...)`` shrinks each attention's qkv/proj weights but
cannot know timm's ``Attention`` attributes; after ``pruner.step()`` they must
be set from the pruner's new head counts or the forward reshapes wrongly.
"""

from __future__ import annotations

from torch import nn

__all__ = ["vit_num_heads", "sync_vit_heads"]


def vit_num_heads(model: nn.Module) -> dict[nn.Module, int]:
    """``{attention.qkv: num_heads}`` of every timm ViT attention (for MetaPruner)."""
    from timm.models.vision_transformer import Attention

    return {m.qkv: m.num_heads for m in model.modules() if isinstance(m, Attention)}


def sync_vit_heads(model: nn.Module, pruner) -> None:
    """Set num_heads / head_dim / attn_dim of timm attentions after ``pruner.step()``."""
    from timm.models.vision_transformer import Attention

    for m in model.modules():
        if isinstance(m, Attention):
            m.num_heads = pruner.num_heads[m.qkv]
            m.head_dim = m.qkv.out_features // (3 * m.num_heads)
            m.attn_dim = m.num_heads * m.head_dim
