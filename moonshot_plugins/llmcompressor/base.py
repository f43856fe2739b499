"""MOONSHOT modifiers for LLM Compressor.

Each modifier is its host (``SparseGPTModifier`` / ``WandaPruningModifier``)
plus one gradient pass on the dense model before sequential pruning. The host
accumulates its reconstruction statistic as usual; just before the host's
solver runs on a layer, that statistic is augmented with the layer's Taylor
term (see :mod:`moonshot_plugins.core.objective`). All math lives in
:mod:`moonshot_plugins.core`; this file only translates the host's lifecycle.
"""

from __future__ import annotations

from typing import Any

import torch
from compressed_tensors.utils import (
    align_module_device,
    match_named_modules,
    match_targets,
    update_offload_parameter,
)
from loguru import logger
from pydantic import BaseModel, PrivateAttr, field_validator, model_validator

from llmcompressor.core import State
from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
from llmcompressor.modifiers.pruning.sparsegpt.sgpt_base import PRUNABLE_LAYER_TYPES
from llmcompressor.modifiers.pruning.wanda import WandaPruningModifier
from llmcompressor.modifiers.utils.hooks import HooksMixin
from llmcompressor.utils.dev import get_main_device
from llmcompressor.utils.metric_logging import CompressionLogger

from moonshot_plugins.core import (
    AUTO,
    FisherCollector,
    auto_taylor_weight,
    causal_lm_sample_losses,
    chunked_causal_lm_sample_losses,
    combine_diagonal,
    combine_hessians,
    layer_inputs,
    moonshot_wanda_scores,
    row_objective_weights,
    row_wise_mask,
    run_gradient_pass,
    token_objective_weights,
    validate_fisher_mode,
    validate_taylor_weight,
)
from moonshot_plugins.core import release_freed_memory, restore_weight, standardized_weight

__all__ = ["MoonshotSparseGPTModifier", "MoonshotWandaModifier"]

GRADIENT_DTYPES = {"bfloat16": torch.bfloat16, "float32": None}


def _num_samples(dataloader) -> int | None:
    """Samples one pass over ``dataloader`` yields, when it can tell."""
    try:
        return len(dataloader.batch_sampler.sampler)
    except (AttributeError, TypeError):
        return None


class _CausalLMLosses:
    """Per-sample causal-LM losses for the gradient pass (labels = input_ids,
    padding masked).

    When the model is a body plus an output embedding with nothing in between
    (checked once, against the model's own last-position logits), the head and
    the loss run in chunks of positions (:func:`chunked_causal_lm_sample_losses`)
    so the B x T x vocab logits never exist at once: they were the largest
    single item of the pass's memory. Other models take the plain path.
    """

    def __init__(self) -> None:
        self.chunked: bool | None = None

    def __call__(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        device = next(model.parameters()).device
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        input_ids = batch["input_ids"]
        attention_mask = batch.get("attention_mask")
        if self.chunked is None:
            self.chunked = _head_is_separable(model, input_ids[:1], _first(attention_mask))
        if self.chunked:
            hidden = model.base_model(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            ).last_hidden_state
            return chunked_causal_lm_sample_losses(
                hidden, model.get_output_embeddings(), input_ids, attention_mask
            )
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return causal_lm_sample_losses(logits, input_ids, attention_mask)


def _first(mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if mask is None else mask[:1]


@torch.no_grad()
def _head_is_separable(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> bool:
    """Whether logits == output_embedding(base_model(...).last_hidden_state)."""
    head = getattr(model, "get_output_embeddings", lambda: None)()
    body = getattr(model, "base_model", model)
    if head is None or body is model:
        return False
    try:
        reference = model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1
        ).logits[:, -1]
        hidden = body(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state
    except (TypeError, AttributeError):
        return False
    split = head(hidden[:, -1:])[:, -1]
    return torch.allclose(reference.float(), split.float(), rtol=1e-3, atol=1e-3)


DEFAULT_TAYLOR_WEIGHT = 0.5  # where taylor_weight="auto" is not defined


class MoonshotFields(BaseModel):
    """Fields and the gradient pass shared by both MOONSHOT modifiers.

    :param taylor_weight: lam in [0, 1], weight of the Taylor (Fisher) term;
        0 reproduces the host exactly, 1 is Taylor-only. "auto" (token mode):
        per layer, the largest lam that keeps the effective sample size of the
        reweighted positions at half of them
        (:func:`moonshot_plugins.core.auto_taylor_weight`). Default: "auto"
        for MoonshotSparseGPTModifier in token mode (chosen on a held-out
        calibration-side text, docs/results.md), else 0.5
    :param fisher_mode: "token" (each position a rank-one sample, same cost as
        X^T X) or "sample" (per-sample gradient outer products)
    :param fisher_samples: calibration samples fed to the gradient pass
        (None = all of them)
    :param offload_fisher: keep Fisher accumulators on the CPU (the d_in x d_in
        and diagonal statistics; SparseGPT's token mode keeps only per-position
        weights, which always live on the CPU)
    :param gradient_dtype: "bfloat16" (default) or "float32": precision of the
        gradient pass's matmuls (autocast). bf16 is about 4x faster on CPUs with
        AVX512-BF16 and on GPUs; the Fisher is always accumulated in fp32.
    """

    taylor_weight: float | str = DEFAULT_TAYLOR_WEIGHT
    fisher_mode: str = "token"
    fisher_samples: int | None = None
    offload_fisher: bool = False
    gradient_dtype: str = "bfloat16"

    _fisher: dict[torch.nn.Module, torch.Tensor] = PrivateAttr(default_factory=dict)
    # token-Fisher reweighting (SparseGPT, fisher_mode="token"): per module the
    # per-sample weights w_t, the energies (A, B) and the input fingerprints;
    # _sample_of maps the host's sample index to the gradient pass's
    _token_weights: dict[torch.nn.Module, list[torch.Tensor]] = PrivateAttr(default_factory=dict)
    _token_energies: dict[torch.nn.Module, tuple[float, float]] = PrivateAttr(default_factory=dict)
    _fingerprints: dict[torch.nn.Module, list[torch.Tensor]] = PrivateAttr(default_factory=dict)
    _sample_of: dict[int, int | None] = PrivateAttr(default_factory=dict)
    _fisher_fraction: float = PrivateAttr(default=1.0)
    _layer_taylor_weight: dict[torch.nn.Module, float] = PrivateAttr(default_factory=dict)
    _row_sensitivities: dict[torch.nn.Module, torch.Tensor] = PrivateAttr(default_factory=dict)

    @field_validator("taylor_weight", mode="before")
    @classmethod
    def _check_taylor_weight(cls, value: Any) -> float | str:
        return validate_taylor_weight(value, allow_auto=True)

    @model_validator(mode="after")
    def _check_auto_is_supported(self):
        if self.taylor_weight == AUTO and self.fisher_mode != "token":
            if "taylor_weight" not in self.model_fields_set:
                # the class default "auto" where no rule exists: the fixed default
                self.taylor_weight = DEFAULT_TAYLOR_WEIGHT
                return self
            raise ValueError(
                "taylor_weight='auto' needs fisher_mode='token' (the rule reads the "
                f"per-position Fisher weights); {type(self).__name__} with fisher_mode="
                f"{self.fisher_mode!r} needs a number in [0, 1]"
            )
        return self

    @field_validator("fisher_mode")
    @classmethod
    def _check_fisher_mode(cls, value: str) -> str:
        return validate_fisher_mode(value)

    @field_validator("gradient_dtype")
    @classmethod
    def _check_gradient_dtype(cls, value: str) -> str:
        if value not in GRADIENT_DTYPES:
            raise ValueError(
                f"gradient_dtype must be one of {sorted(GRADIENT_DTYPES)}, got {value!r}"
            )
        return value

    @field_validator("fisher_samples")
    @classmethod
    def _check_fisher_samples(cls, value: int | None) -> int | None:
        if value is not None and value <= 0:
            raise ValueError(
                f"fisher_samples must be a positive integer or None (all samples), got {value}"
            )
        return value

    def _fisher_statistic(self) -> str:
        """What the host consumes: "token_weights" (inputs reweighted during the
        host's own accumulation), "matrix" (d_in x d_in) or "diagonal"."""
        raise NotImplementedError

    def _moonshot_modules(self) -> dict[str, torch.nn.Module]:
        """The layers the host will prune, selected exactly as the host does."""
        modules = {}
        for layer_name, layer in self._target_layers.items():
            for name, module in match_named_modules(layer, PRUNABLE_LAYER_TYPES):
                name = f"{layer_name}.{name}"
                if match_targets(name, module, self.ignore) or isinstance(
                    module, torch.nn.Embedding
                ):
                    continue
                modules[name] = module
        return modules

    def _collect_fisher(self, model: torch.nn.Module, dataloader) -> None:
        if dataloader is None:
            raise ValueError(
                f"{type(self).__name__} with taylor_weight > 0 needs calibration data "
                "(pass `dataset=` to oneshot) for its gradient pass"
            )
        modules = self._moonshot_modules()
        statistic = self._fisher_statistic()
        collector = FisherCollector(
            modules,
            fisher_mode=self.fisher_mode,
            matrix=statistic == "matrix",
            diagonal=statistic == "diagonal",
            # the auto rule reads per-position weights in either statistic
            token_weights=statistic == "token_weights" or self.taylor_weight == AUTO,
            offload=self.offload_fisher,
        )
        # The gradient pass needs the whole model on one device; use the
        # accelerator the host will calibrate on when there is one.
        original_device = next(model.parameters()).device
        device = get_main_device()
        if device != original_device:
            model.to(device)
        try:
            with HooksMixin.disable_hooks():
                used = run_gradient_pass(
                    model,
                    dataloader,
                    collector,
                    _CausalLMLosses(),
                    max_samples=self.fisher_samples,
                    desc=f"{type(self).__name__} gradient pass",
                    autocast_dtype=GRADIENT_DTYPES[self.gradient_dtype],
                    # recomputing the decoder blocks' activations keeps the
                    # pass's peak memory near the host's own
                    checkpoint_modules=[
                        block for _, block in match_named_modules(model, self._sequential_targets)
                    ],
                )
        finally:
            if device != original_device:
                model.to(original_device)
        logger.info(
            f"MOONSHOT: {self.fisher_mode} Fisher of {len(modules)} layers "
            f"from {used} calibration samples"
        )
        if statistic == "token_weights":
            total = _num_samples(dataloader) or used
            self._fisher_fraction = min(1.0, used / total)
        for name, module in modules.items():
            # one lam per layer: the auto rule on the per-position weights, or the fixed lam
            self._layer_taylor_weight[module] = (
                auto_taylor_weight(
                    torch.cat(collector.token_weights(name)), *collector.token_energies(name)
                )
                if self.taylor_weight == AUTO
                else self.taylor_weight
            )
            if statistic == "token_weights":
                self._token_energies[module] = collector.token_energies(name)
                self._token_weights[module] = collector.token_weights(name)
                self._fingerprints[module] = collector.input_sums(name)
                self._row_sensitivities[module] = collector.row_sensitivities(name)
            else:
                matrix, diagonal = collector.pop(name)
                # already on the CPU when offload_fisher: the collector offloads
                self._fisher[module] = matrix if statistic == "matrix" else diagonal
        if self.taylor_weight == AUTO:
            lams = torch.tensor(list(self._layer_taylor_weight.values()))
            logger.info(
                f"MOONSHOT taylor_weight=auto: per-layer lam min {lams.min():.3f}, "
                f"median {lams.median():.3f}, max {lams.max():.3f}"
            )

    def calibrate_module(
        self, module: torch.nn.Module, args: tuple[torch.Tensor, ...], _output: torch.Tensor
    ):
        """The host's calibration hook, fed sqrt(c_t)-reweighted inputs when the
        Taylor term is folded into the host's own statistic."""
        if module in self._token_weights:
            args = (self._reweighted_input(module, args[0]), *args[1:])
        return super().calibrate_module(module, args, _output)

    def _reweighted_input(self, module: torch.nn.Module, inp: torch.Tensor) -> torch.Tensor:
        """sqrt(c_t) * x_t for this batch, so the host's X^T X accumulation
        becomes (1-lam) H_rec + lam (s_rec/s_F) F_token (see
        :func:`token_objective_weights`)."""
        seen = self._num_samples.get(module, 0)  # samples the host already holds
        lam = self._layer_taylor_weight[module]
        x = layer_inputs(module, inp)
        scale = torch.full(x.shape[:2], 1.0 - lam, dtype=torch.float32)
        for k in range(x.shape[0]):
            index = self._gradient_sample(module, seen + k, x[k])
            if index is None:
                continue  # not in the gradient pass (fisher_samples): recon term only
            scale[k] = token_objective_weights(
                self._token_weights[module][index],
                *self._token_energies[module],
                lam,
                self._fisher_fraction,
            )
        root = scale.sqrt().to(device=x.device, dtype=x.dtype).unsqueeze(-1)
        return (x * root).reshape(inp.shape)

    def _gradient_sample(self, module: torch.nn.Module, index: int, x: torch.Tensor) -> int | None:
        """Which gradient-pass sample is the host's sample ``index``.

        oneshot's dataloader may reshuffle on every pass, so samples are matched
        by content: the first layer to see a sample (still dense there) compares
        its per-position input sums with the gradient pass's and fixes the match
        for every later layer.
        """
        if index in self._sample_of:
            return self._sample_of[index]
        found = x.float().sum(dim=-1).cpu()
        fingerprints = self._fingerprints[module]
        claimed = set(self._sample_of.values())
        candidates = [
            c for c, fp in enumerate(fingerprints) if c not in claimed and fp.shape == found.shape
        ]
        best, best_distance = None, float("inf")
        if candidates:
            stacked = torch.stack([fingerprints[c] for c in candidates])
            distances = (stacked - found).norm(dim=1) / stacked.norm(dim=1).clamp(min=1e-12)
            nearest = int(distances.argmin())
            best, best_distance = candidates[nearest], distances[nearest].item()
        # identical inputs differ by rounding only (bf16 autocast at most);
        # different text differs by O(1)
        if best_distance > 0.05:
            best = None
            if self._fisher_fraction == 1.0:
                raise RuntimeError(
                    f"calibration sample {index} was not seen by the MOONSHOT gradient "
                    "pass: the calibration dataloader must yield the same samples on "
                    "every pass (in any order)"
                )
        self._sample_of[index] = best
        return best

    def _moonshot_initialize(self, state: State) -> None:
        if self.taylor_weight != 0.0:  # a number > 0 or "auto"
            self._collect_fisher(state.model, state.data.calib)


class MoonshotSparseGPTModifier(MoonshotFields, SparseGPTModifier):
    """SparseGPT on the MOONSHOT objective (1-lam) recon + lam taylor.

    The host's row-shared Hessian (2/n) X^T X is replaced, per layer, by
    (1-lam) H + lam (s_H / s_F) F with F the row-averaged empirical Fisher;
    SparseGPT's own solver (one Cholesky per layer) then runs unchanged.
    In token mode (the default) F is folded into the host's own accumulation
    by reweighting each position's input, and ``taylor_weight`` defaults to
    "auto" (a lam per layer); in sample mode it defaults to 0.5.

    ``row_weights`` (default on for unstructured masks in token mode, off
    elsewhere): the row-shared Fisher averages the output rows, but row i's
    own token Fisher is about s_i times that average. Row i's objective is
    weighted by m_i = (1-lam_r) + lam_r s_i, applied by scaling row i by
    sqrt(m_i) around the host's unchanged solver, so an unstructured mask
    prunes insensitive rows harder; lam_r is the layer's lam capped by the
    ``auto`` rule applied to the rows (:func:`row_objective_weights`), so no
    row is pruned whole on a noisy estimate. ``row_weights: false`` gives the
    row-shared objective alone.

    Sample yaml:

    ```yaml
    sparsity_stage:
      sparsity_modifiers:
        MoonshotSparseGPTModifier:
          sparsity: 0.5
          mask_structure: "2:4"
          taylor_weight: auto       # or a fixed lam in [0, 1]
          fisher_mode: "token"
          targets: ["Linear"]
          ignore: ["re:.*lm_head"]
    ```

    All ``SparseGPTModifier`` fields apply (``sparsity_profile: owl``,
    ``block_size``, ``dampening_frac`` ...), plus ``taylor_weight``,
    ``fisher_mode``, ``fisher_samples`` and ``offload_fisher``
    (see :class:`MoonshotFields`).
    """

    taylor_weight: float | str = AUTO
    row_weights: bool = True

    @model_validator(mode="after")
    def _check_row_weights(self):
        if self.row_weights and (self.fisher_mode != "token" or self.mask_structure != "0:0"):
            if "row_weights" not in self.model_fields_set:
                # the class default where row weights cannot apply: off
                self.row_weights = False
                return self
            raise ValueError(
                "row_weights=True needs fisher_mode='token' and unstructured sparsity "
                f"(mask_structure='0:0'), got fisher_mode={self.fisher_mode!r}, "
                f"mask_structure={self.mask_structure!r}: an N:M mask keeps N of every M "
                "weights in each row, so weighting rows cannot change it"
            )
        return self

    def _fisher_statistic(self) -> str:
        return "token_weights" if self.fisher_mode == "token" else "matrix"

    def on_initialize(self, state: State, **kwargs) -> bool:
        initialized = super().on_initialize(state, **kwargs)
        self._moonshot_initialize(state)
        return initialized

    def compress_modules(self):
        row_roots = self._scale_rows() if self.row_weights else {}
        for module in list(self._num_samples):
            self._token_weights.pop(module, None)
            self._fingerprints.pop(module, None)
            fisher = self._fisher.pop(module, None)
            if fisher is None:
                continue
            with self._maybe_onload_hessian(module):
                self._hessians[module] = combine_hessians(
                    self._hessians[module], fisher, self.taylor_weight
                )
        super().compress_modules()
        for module, root in row_roots.items():
            _set_weight(module, standardized_weight(module) / root.unsqueeze(1))
        # After the gradient pass the allocator keeps each layer's freed buffers
        # in a fragmented heap: without this, anonymous memory grew by ~65 MB
        # per decoder layer (2:4 SmolLM2: peak 2.59 GB vs 1.24 GB with it).
        release_freed_memory()

    def _scale_rows(self) -> dict[torch.nn.Module, torch.Tensor]:
        """Multiply each row of the layers about to be pruned by sqrt(m_i)
        (:func:`row_objective_weights`); returns the factors to undo it."""
        roots = {}
        for module in list(self._num_samples):
            sensitivities = self._row_sensitivities.pop(module, None)
            if sensitivities is None:
                continue
            lam = self._layer_taylor_weight[module]
            with torch.no_grad(), align_module_device(module):
                weight = standardized_weight(module)
                root = row_objective_weights(sensitivities, lam).sqrt().to(weight.device, weight.dtype)
            _set_weight(module, weight * root.unsqueeze(1))
            roots[module] = root
        return roots

    def on_finalize(self, state: State, **kwargs) -> bool:
        self._fisher = dict()
        self._row_sensitivities = dict()
        self._token_weights = dict()
        self._layer_taylor_weight = dict()
        self._fingerprints = dict()
        self._sample_of = dict()
        return super().on_finalize(state, **kwargs)


def _set_weight(module: torch.nn.Module, weight: torch.Tensor) -> None:
    """Write a (d_out, d_in) weight back in the layer's own layout (offload-aware)."""
    with torch.no_grad():
        update_offload_parameter(module, "weight", restore_weight(module, weight))


class MoonshotWandaModifier(MoonshotFields, WandaPruningModifier):
    """Wanda on the MOONSHOT objective: score W_ij^2 * S_ij with
    S_ij = (1-lam) ||X_j||^2/n + lam (s_r / s_F) F_ij, F the per-weight
    diagonal empirical Fisher. Wanda's own rule (lowest scores per output row,
    N:M or unstructured) selects the mask.

    Sample yaml:

    ```yaml
    sparsity_stage:
      sparsity_modifiers:
        MoonshotWandaModifier:
          sparsity: 0.5
          mask_structure: "2:4"
          taylor_weight: 0.5
          targets: ["Linear"]
          ignore: ["re:.*lm_head"]
    ```
    """

    def _fisher_statistic(self) -> str:
        return "diagonal"

    def on_initialize(self, state: State, **kwargs) -> bool:
        initialized = super().on_initialize(state, **kwargs)
        self._moonshot_initialize(state)
        return initialized

    def compress_modules(self):
        if self.taylor_weight == 0.0:
            return super().compress_modules()
        for module in list(self._num_samples):
            name = self._module_names[module]
            logger.info(f"Sparsifying {name} using {self._num_samples[module]} samples")
            with torch.no_grad(), align_module_device(module), CompressionLogger(module):
                curvature = combine_diagonal(
                    self._row_scalars.pop(module),
                    self._fisher.pop(module),
                    self._layer_taylor_weight.pop(module),
                )
                weight = standardized_weight(module).to(curvature.dtype)
                mask = row_wise_mask(
                    moonshot_wanda_scores(weight, curvature),
                    self._module_sparsities[module],
                    self._prune_n,
                    self._prune_m,
                )
                weight[mask] = 0.0
                pruned = restore_weight(module, weight)
            update_offload_parameter(module, "weight", pruned)
            del self._num_samples[module]
        release_freed_memory()  # as in MoonshotSparseGPTModifier.compress_modules

    def on_finalize(self, state: State, **kwargs) -> bool:
        self._fisher = dict()
        self._layer_taylor_weight = dict()
        return super().on_finalize(state, **kwargs)
