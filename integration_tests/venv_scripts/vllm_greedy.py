"""Child script run by the vLLM venv's python (see integration_tests/venvs.py).

Usage: python vllm_greedy.py REQUEST.json RESPONSE.json

Imports nothing from moonshot_plugins (not installed in that venv). vLLM
spawns worker processes, hence the ``__main__`` guard.
"""

import json
import sys
import time


def main(request_path: str, response_path: str) -> None:
    with open(request_path) as fh:
        req = json.load(fh)

    import vllm
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(
        model=req["model"],
        dtype=req.get("dtype", "float32"),
        enforce_eager=True,
        max_model_len=req.get("max_model_len", 512),
        seed=0,
    )
    load_seconds = time.perf_counter() - start

    quantization = None
    try:
        quantization = llm.llm_engine.model_config.quantization
    except AttributeError:
        pass

    params = SamplingParams(temperature=0.0, max_tokens=req["max_tokens"])
    prompts = [{"prompt_token_ids": ids} for ids in req["prompt_token_ids"]]
    start = time.perf_counter()
    results = llm.generate(prompts, params, use_tqdm=False)
    generate_seconds = time.perf_counter() - start

    with open(response_path, "w") as fh:
        json.dump(
            {
                "outputs": [list(r.outputs[0].token_ids) for r in results],
                "vllm_version": vllm.__version__,
                "quantization": quantization,
                "load_seconds": round(load_seconds, 1),
                "generate_seconds": round(generate_seconds, 2),
            },
            fh,
        )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
