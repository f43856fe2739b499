"""Inspect and convert saved sparse checkpoints.

* :func:`check_checkpoint` (``check.py``) -- per targeted layer sparsity and
  whether it is exactly N:M (default 2:4), plus the global sparsity, read
  from the safetensors files of a saved checkpoint (sharded or not).
* :func:`export_sparse24_bitmask` (``export.py``) -- writes the legacy
  compressed-tensors ``sparse-24-bitmask`` checkpoint (dropped by
  compressed-tensors > 0.14 and vLLM >= 0.19.1) for stacks on vLLM 0.7-0.19;
  the per-layer packing is in ``bitmask.py``.
* :func:`register_cli` (``cli.py``) -- the ``moonshot check`` and
  ``moonshot export`` subcommands.

Which layers are checked (``targets.py``). LLM Compressor saves the recipe
beside the checkpoint (``recipe.yaml``); the ``targets``/``ignore`` of its
sparsity modifiers (any modifier with a ``sparsity`` field) select the layers,
matched exactly as LLM Compressor matches them (compressed-tensors' ``re:``
regexes, exact names, class names such as ``Linear``) against a weightless
copy of the model built from ``config.json``. Without a recipe every 2-D
``Linear`` weight except embeddings and ``lm_head`` is checked.
``targets``/``ignore`` arguments override the recipe's.
"""

from moonshot_plugins.checkpoint.bitmask import pack_bitmask, sparse24_compress, sparse24_decompress, unpack_bitmask
from moonshot_plugins.checkpoint.check import CheckReport, LayerReport, check_checkpoint
from moonshot_plugins.checkpoint.cli import register_cli
from moonshot_plugins.checkpoint.export import ExportResult, export_sparse24_bitmask
from moonshot_plugins.checkpoint.safetensors_io import CheckpointError

__all__ = [
    "CheckpointError",
    "CheckReport",
    "ExportResult",
    "LayerReport",
    "check_checkpoint",
    "export_sparse24_bitmask",
    "pack_bitmask",
    "register_cli",
    "sparse24_compress",
    "sparse24_decompress",
    "unpack_bitmask",
]
