"""LLM Compressor adapter: MOONSHOT modifiers, registered with ModifierFactory.

After ``import moonshot_plugins`` the names ``MoonshotSparseGPTModifier`` and
``MoonshotWandaModifier`` work in recipe YAML and in ``oneshot(recipe=...)``.
"""

from llmcompressor.modifiers.factory import ModifierFactory

from moonshot_plugins.llmcompressor.base import (
    MoonshotSparseGPTModifier,
    MoonshotWandaModifier,
)

__all__ = ["MoonshotSparseGPTModifier", "MoonshotWandaModifier"]

for _modifier in (MoonshotSparseGPTModifier, MoonshotWandaModifier):
    ModifierFactory.register(_modifier.__name__, _modifier)
