"""moonshot-plugins: MOONSHOT multi-objective one-shot pruning for existing tools.

Importing the package registers the LLM Compressor modifiers
(``MoonshotSparseGPTModifier``, ``MoonshotWandaModifier``) so recipe stanzas
naming them resolve. The framework-free math is in :mod:`moonshot_plugins.core`.
"""

from moonshot_plugins.llmcompressor import MoonshotSparseGPTModifier, MoonshotWandaModifier

__version__ = "0.1.0"
__all__ = ["MoonshotSparseGPTModifier", "MoonshotWandaModifier", "__version__"]
