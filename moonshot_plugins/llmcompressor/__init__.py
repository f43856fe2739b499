"""LLM Compressor adapter: MOONSHOT modifiers, registered with ModifierFactory.

After ``import moonshot_plugins.llmcompressor`` (or the first access of
``moonshot_plugins.MoonshotSparseGPTModifier`` / ``MoonshotWandaModifier``)
the names work in recipe YAML and in ``oneshot(recipe=...)``.

Each modifier is its host (``SparseGPTModifier`` / ``WandaPruningModifier``)
plus one gradient pass on the dense model before sequential pruning; all math
lives in :mod:`moonshot_plugins.core`, these files only translate the hosts'
lifecycle:

- ``sparsegpt.py``, ``wanda.py``: the two modifiers (fields and host hooks);
- ``mixin.py``: their shared fields and the gradient pass at ``on_initialize``;
- ``host_fields.py``: checks of the host fields passed through (``sparsity``,
  ``mask_structure``, ``targets`` ...) and of layer widths under N:M;
- ``gradient_pass.py``: the pass and its per-layer record, ``LayerTaylorStatistics``;
- ``token_reweighting.py``: SparseGPT's token mode (inputs reweighted, samples matched);
- ``row_weights.py``: SparseGPT's per-row objective weights;
- ``causal_lm.py``: the per-sample causal-LM losses the pass differentiates;
- ``distributed.py``: under ``torchrun``, the reductions across ranks, the
  layers spread over the ranks, and the checks that the ranks agree.
"""

from llmcompressor.modifiers.factory import ModifierFactory

from moonshot_plugins.llmcompressor.sparsegpt import MoonshotSparseGPTModifier
from moonshot_plugins.llmcompressor.wanda import MoonshotWandaModifier

__all__ = ["MoonshotSparseGPTModifier", "MoonshotWandaModifier"]

for _modifier in (MoonshotSparseGPTModifier, MoonshotWandaModifier):
    ModifierFactory.register(_modifier.__name__, _modifier)
