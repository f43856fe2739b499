"""moonshot-plugins: MOONSHOT multi-objective one-shot pruning for existing tools.

* :mod:`moonshot_plugins.core`: framework-free tensor math (no host import);
* :mod:`moonshot_plugins.llmcompressor`: ``MoonshotSparseGPTModifier`` and
  ``MoonshotWandaModifier``; importing it registers them with LLM Compressor,
  so recipe stanzas naming them resolve;
* :mod:`moonshot_plugins.torch_pruning`: ``MoonshotImportance``.

The modifiers are also reachable here (``from moonshot_plugins import
MoonshotSparseGPTModifier``); LLM Compressor is imported on that first access
only, so ``import moonshot_plugins.torch_pruning`` never loads it.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["MoonshotSparseGPTModifier", "MoonshotWandaModifier", "__version__"]

_MODIFIERS = ("MoonshotSparseGPTModifier", "MoonshotWandaModifier")


def __getattr__(name: str) -> Any:
    if name in _MODIFIERS:
        from moonshot_plugins import llmcompressor

        return getattr(llmcompressor, name)
    raise AttributeError(f"module 'moonshot_plugins' has no attribute {name!r}")
