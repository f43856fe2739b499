"""One run of the SmolLM2-135M benchmark, in the child process that measures it.

``python -m benchmarks.llm --one RUN_JSON`` calls :func:`run_one`: it loads the
model, prunes it as the run says (dense, magnitude, a host, or MOONSHOT)
under a wall-clock timer and a peak-memory probe, and scores the evaluation
texts. The data are those of :mod:`benchmarks.protocol` (:func:`run_data`).
"""

from __future__ import annotations

import pathlib
import resource
import time
from typing import Any


def run_data(settings: dict[str, Any], run: dict[str, Any]):
    """Calibration loader of the run's (source, draw) and evaluation ids
    (token ids cached on disk), see :mod:`benchmarks.protocol`."""
    import torch
    from transformers import AutoTokenizer

    from benchmarks.protocol import EVALUATION_TEXTS, HELDOUT_TEXTS, draw_loader, text_sources
    from moonshot_plugins.assets import cache_dir, smollm2_dir
    from moonshot_plugins.lm import tokenize

    model_dir = smollm2_dir()
    cache = cache_dir() / "benchmark-protocol-tokens.pt"
    ids = torch.load(cache) if cache.exists() else {}
    texts = text_sources()
    if set(texts) - set(ids):
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        ids = {name: ids[name] if name in ids else tokenize(tokenizer, text())
               for name, text in texts.items()}
        torch.save(ids, cache)
    loader = None
    if "calib_source" in run:
        loader = draw_loader(ids[run["calib_source"]], settings["calib_samples"], settings["seq_len"], run["draw"])
    names = HELDOUT_TEXTS if settings.get("eval_set") == "heldout" else EVALUATION_TEXTS
    evals = {k: ids[k][: settings["eval_tokens"]] for k in names}
    return model_dir, loader, evals


def _structure(sparsity: str) -> dict[str, Any]:
    from moonshot_plugins.core.mask_structure import sparsity_settings

    return sparsity_settings(sparsity)


def _magnitude(model, structure: dict[str, Any]) -> None:
    """Per-output-row magnitude pruning of every Linear but lm_head (no data)."""
    import torch

    from moonshot_plugins.core import row_wise_mask
    from moonshot_plugins.core.mask_structure import parse_mask_structure

    n, m = parse_mask_structure(structure["mask_structure"])
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
                mask = row_wise_mask(module.weight.abs(), structure["sparsity"], n, m)
                module.weight[mask] = 0.0


def resident_mib() -> dict[str, float]:
    """This process's RssAnon and RssFile in MiB (Linux; NaN elsewhere)."""
    fields = {"RssAnon": float("nan"), "RssFile": float("nan")}
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            key = line.split(":")[0]
            if key in fields:
                fields[key] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return fields


class ResidentMemorySampler:
    """(seconds, RssAnon MiB, RssFile MiB) every ``interval_s`` while the block
    runs. Peak RSS alone also counts file-backed pages: SmolLM2's weights are
    memory-mapped from model.safetensors, and a pass that touches them all
    adds the file's size to RSS without allocating anything; the anonymous
    peak is what the run allocated."""

    def __init__(self, interval_s: float = 0.2) -> None:
        self.interval_s = interval_s

    def __enter__(self) -> "ResidentMemorySampler":
        import threading

        self.start, self.samples, self._stop = time.perf_counter(), [], threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def now(self) -> float:
        """Seconds since the block started, to 0.1 s."""
        return round(time.perf_counter() - self.start, 1)

    def _sample(self) -> None:
        mib = resident_mib()
        self.samples.append((self.now(), mib["RssAnon"], mib["RssFile"]))

    def _poll(self) -> None:
        self._sample()
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def peak_anonymous_mib(self) -> float:
        return max(anon for _, anon, _ in self.samples)


def recipe_of(run: dict[str, Any]) -> list[Any] | None:
    """The recipe a host or MOONSHOT run prunes with; None for dense and magnitude."""
    from moonshot_plugins.cli import make_modifier

    if run["method"] not in ("host", "moonshot"):
        return None
    lam = run["lam"] if run["method"] == "moonshot" else None
    extra = run.get("options", {}) if lam is None else {"fisher_mode": run["fisher_mode"], **run.get("options", {})}
    return [make_modifier(run["host"], _structure(run["sparsity"]), lam, **extra)]


def check_runs(runs: list[dict[str, Any]]) -> None:
    """Build every run's recipe before the first run starts, so that a field
    combination no modifier accepts stops the plan at once, naming the run,
    instead of after the runs before it (each takes minutes)."""
    for index, run in enumerate(runs, 1):
        try:
            recipe_of(run)
        except ValueError as exc:  # pydantic's ValidationError is one
            raise SystemExit(f"run {index} of {len(runs)} cannot run, nothing was run: {run}\n{exc}") from None


def prune(model, run: dict[str, Any], loader):
    """The pruned model of one run (``method`` dense, magnitude, host or moonshot)."""
    from moonshot_plugins.lm import run_oneshot

    if run["method"] == "magnitude":
        _magnitude(model, _structure(run["sparsity"]))
    elif run["method"] in ("host", "moonshot"):
        model = run_oneshot(model, recipe_of(run), loader, shuffle_calibration_samples=False)
    return model


def run_one(run: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from moonshot_plugins.lm import perplexity

    torch.manual_seed(0)
    model_dir, loader, evals = run_data(settings, run)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with ResidentMemorySampler() as memory:
        model = prune(model, run, loader)
    seconds = time.perf_counter() - start
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        **run,
        "prune_seconds": seconds,
        "peak_rss_mb": peak_rss_mb,
        "peak_anonymous_mb": memory.peak_anonymous_mib,
        "rss_before_prune_mb": rss_before / 1024,
    }
    for name, ids in evals.items():
        result[f"ppl_{name}"] = perplexity(model, ids, context=settings["context"], desc=name)
    linear = [
        m.weight for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")
    ]
    result["sparsity_measured"] = float(
        sum((w == 0).sum().item() for w in linear) / sum(w.numel() for w in linear)
    )
    return result
