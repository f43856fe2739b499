"""Child script run by the compressed-tensors 0.14.0 venv (see integration_tests/venvs.py).

Usage: python ct014_decompress.py REQUEST.json RESPONSE.json

Decompresses a legacy ``sparse-24-bitmask`` checkpoint two ways, both with
the old library's own code, and saves the dense state dicts:

* ``model_compressor.safetensors``: a model built from config.json (random
  init), then ``ModelCompressor.from_pretrained(ckpt).decompress(ckpt, model)``;
* ``transformers.safetensors``: ``AutoModelForCausalLM.from_pretrained(ckpt)``
  under transformers 4.x, whose compressed-tensors integration decompresses.

Imports nothing from moonshot_plugins (not installed in that venv).
"""

import json
import os
import sys


def _state_dict(model):
    # clone: tied weights share storage, which safetensors refuses
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def main(request_path: str, response_path: str) -> None:
    with open(request_path) as fh:
        req = json.load(fh)
    ckpt, out_dir = req["model"], req["out_dir"]
    os.makedirs(out_dir, exist_ok=True)

    import compressed_tensors
    import torch
    import transformers
    from compressed_tensors.compressors import ModelCompressor
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    compressor = ModelCompressor.from_pretrained(ckpt)
    if compressor is None or compressor.sparsity_config is None:
        raise SystemExit(f"{ckpt}: compressed-tensors {compressed_tensors.__version__} found no sparsity config")
    config = AutoConfig.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    compressor.decompress(ckpt, model)
    # decompress swaps in new parameters, which unties tied weights (lm_head /
    # embed_tokens); re-tie as from_pretrained does after loading
    model.tie_weights()
    save_file(_state_dict(model), os.path.join(out_dir, "model_compressor.safetensors"))

    loaded = AutoModelForCausalLM.from_pretrained(ckpt, dtype="auto")
    save_file(_state_dict(loaded), os.path.join(out_dir, "transformers.safetensors"))

    with open(response_path, "w") as fh:
        json.dump(
            {
                "compressed_tensors_version": compressed_tensors.__version__,
                "transformers_version": transformers.__version__,
                "torch_version": torch.__version__,
                "sparsity_config": compressor.sparsity_config.model_dump(),
                "compressor": type(compressor.sparsity_compressor).__name__,
            },
            fh,
        )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
