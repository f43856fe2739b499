"""What both MOONSHOT modifiers add to their LLM Compressor host."""

from __future__ import annotations

from typing import Any

import torch
from compressed_tensors.utils import match_named_modules, match_targets
from pydantic import BaseModel, PrivateAttr, field_validator, model_validator

from llmcompressor.core import State
from llmcompressor.modifiers.pruning.sparsegpt.sgpt_base import PRUNABLE_LAYER_TYPES

from moonshot_plugins.core import (
    AUTO,
    AUTO_DTYPE,
    validate_fisher_mode,
    validate_gradient_dtype,
    validate_taylor_weight,
)
from moonshot_plugins.llmcompressor.gradient_pass import (
    LayerTaylorStatistics,
    collect_layer_statistics,
    sampled_fraction,
)
from moonshot_plugins.llmcompressor.token_reweighting import TokenReweighting

__all__ = ["DEFAULT_TAYLOR_WEIGHT", "MoonshotModifierMixin"]

DEFAULT_TAYLOR_WEIGHT = 0.5  # where taylor_weight="auto" is not defined


class MoonshotModifierMixin(BaseModel):
    """The MOONSHOT fields of both modifiers, and the gradient pass run at
    ``on_initialize`` that fills one :class:`LayerTaylorStatistics` per layer
    (dropped at ``on_finalize``). Listed before the host in the bases.

    :param taylor_weight: lam in [0, 1], weight of the Taylor (Fisher) term;
        0 reproduces the host exactly, 1 is Taylor-only. "auto" (token mode):
        per layer, the largest lam that keeps the effective sample size of the
        reweighted positions at half of them
        (:func:`moonshot_plugins.core.auto_taylor_weight`). Default: "auto"
        for MoonshotSparseGPTModifier in token mode (chosen on a held-out
        calibration-side text, docs/experiments.md), else 0.5
    :param fisher_mode: "token" (each position a rank-one sample, same cost as
        X^T X) or "sample" (per-sample gradient outer products)
    :param fisher_samples: calibration samples fed to the gradient pass
        (None = all of them)
    :param offload_fisher: keep Fisher accumulators on the CPU (the d_in x d_in
        and diagonal statistics; SparseGPT's token mode keeps only per-position
        weights, which always live on the CPU)
    :param gradient_dtype: "auto" (default), "bfloat16" or "float32":
        precision of the gradient pass's matmuls (autocast). "auto" picks bf16
        only where the device computes it natively (about 4x faster on GPUs
        and CPUs with AVX512-BF16; emulated bf16 is 3x to 500x slower than
        fp32), see :mod:`moonshot_plugins.core.precision`. The Fisher is always
        accumulated in fp32.
    """

    taylor_weight: float | str = DEFAULT_TAYLOR_WEIGHT
    fisher_mode: str = "token"
    fisher_samples: int | None = None
    offload_fisher: bool = False
    gradient_dtype: str = AUTO_DTYPE

    # per layer the host prunes, what the gradient pass measured; a layer's
    # record is dropped once the host has compressed it
    _layer_statistics: dict[torch.nn.Module, LayerTaylorStatistics] = PrivateAttr(
        default_factory=dict
    )
    # "token_weights" statistic only (SparseGPT, fisher_mode="token")
    _token_reweighting: TokenReweighting | None = PrivateAttr(default=None)

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
        return validate_gradient_dtype(value)

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

    def on_initialize(self, state: State, **kwargs) -> bool:
        """The host's initialization, then the gradient pass (unless lam == 0)."""
        initialized = super().on_initialize(state, **kwargs)
        if self.taylor_weight != 0.0:  # a number > 0 or "auto"
            self._collect_layer_statistics(state.model, state.data.calib)
        return initialized

    def on_finalize(self, state: State, **kwargs) -> bool:
        """Drop every MOONSHOT statistic, then the host's finalization."""
        self._layer_statistics = dict()
        self._token_reweighting = None
        return super().on_finalize(state, **kwargs)

    def _moonshot_modules(self) -> dict[str, torch.nn.Module]:
        """The layers the host will prune, by name.

        Mirrors the layer selection of the host's ``on_calibration_start``
        (llmcompressor 0.14, ``SparsityModifierBase``): every
        ``PRUNABLE_LAYER_TYPES`` module inside the ``targets`` layers, minus
        ``ignore`` matches and embeddings, named ``{target layer}.{module}``.
        The gradient pass runs before that hook, so the selection is repeated here.
        """
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

    def _collect_layer_statistics(self, model: torch.nn.Module, dataloader) -> None:
        if dataloader is None:
            raise ValueError(
                f"{type(self).__name__} with taylor_weight > 0 needs calibration data "
                "(pass `dataset=` to oneshot) for its gradient pass"
            )
        statistic = self._fisher_statistic()
        self._layer_statistics, used = collect_layer_statistics(
            model,
            dataloader,
            self._moonshot_modules(),
            statistic=statistic,
            taylor_weight=self.taylor_weight,
            fisher_mode=self.fisher_mode,
            fisher_samples=self.fisher_samples,
            offload_fisher=self.offload_fisher,
            gradient_dtype=self.gradient_dtype,
            checkpoint_modules=[
                block for _, block in match_named_modules(model, self._sequential_targets)
            ],
            desc=f"{type(self).__name__} gradient pass",
        )
        if statistic == "token_weights":
            self._token_reweighting = TokenReweighting(sampled_fraction(dataloader, used))
