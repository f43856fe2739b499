"""What both MOONSHOT modifiers add to their LLM Compressor host."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from compressed_tensors.utils import match_named_modules, match_targets
from pydantic import BaseModel, PrivateAttr, field_validator, model_validator

from llmcompressor.core import State
from llmcompressor.modifiers.pruning.sparsegpt.sgpt_base import PRUNABLE_LAYER_TYPES

from moonshot_plugins.core import (
    AUTO,
    AUTO_DTYPE,
    ZERO_FISHER_TAYLOR_ONLY,
    NonFiniteError,
    check_finite_parameters,
    describe_non_finite,
    validate_fisher_mode,
    validate_gradient_dtype,
    validate_taylor_weight,
)
from moonshot_plugins.llmcompressor.distributed import (
    broadcast_weights,
    calibration_sample_digests,
    check_ranks_agree,
    global_sampled_fraction,
    is_distributed,
    raised_on_every_rank,
    reduce_layer_statistics,
    reduce_to_owners,
)
from moonshot_plugins.llmcompressor.gradient_pass import (
    LayerTaylorStatistics,
    collect_layer_statistics,
    sampled_fraction,
)
from moonshot_plugins.llmcompressor.host_fields import (
    check_layer_widths,
    check_sparsity_list,
    checked_sparsity,
    validate_ignore,
    validate_mask_structure,
    validate_sparsity,
    validate_targets,
)
from moonshot_plugins.llmcompressor.token_reweighting import TokenReweighting

__all__ = ["DEFAULT_TAYLOR_WEIGHT", "MoonshotModifierMixin"]

DEFAULT_TAYLOR_WEIGHT = 0.5  # where taylor_weight="auto" is not defined


class MoonshotModifierMixin(BaseModel):
    """The MOONSHOT fields of both modifiers, and the gradient pass run at
    ``on_initialize`` that fills one :class:`LayerTaylorStatistics` per layer
    (dropped at ``on_finalize``). Listed before the host in the bases.

    The host fields passed through are checked too
    (:mod:`~moonshot_plugins.llmcompressor.host_fields`), and the run stops
    before any weight changes on a NaN/inf weight, loss or statistic, on
    calibration data the gradient pass cannot use, on targets that select no
    layer, and on a layer whose width is not a multiple of M under "N:M":

    :param sparsity: fraction of each pruned layer's weights set to zero, in
        (0, 1) (or a list, one per target layer). Under an N:M
        ``mask_structure`` the host prunes exactly N of every M weights, so
        ``sparsity`` must be N/M or left out (it then defaults to N/M); a
        different value is an error, not silently ignored. Required for
        unstructured ``"0:0"``.
    :param mask_structure: ``"N:M"`` with 0 < N < M (prune N of every M
        consecutive input weights; every pruned layer's input width must be a
        multiple of M) or ``"0:0"`` (unstructured, the default)

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

    sparsity: float | list[float] | None = None  # the host's field; None: N/M under "N:M"
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

    @field_validator("sparsity", mode="before")
    @classmethod
    def _check_sparsity(cls, value: Any) -> float | list[float] | None:
        return validate_sparsity(value)

    @field_validator("mask_structure", mode="before", check_fields=False)
    @classmethod
    def _check_mask_structure(cls, value: Any) -> str:
        return validate_mask_structure(value)

    @field_validator("targets", check_fields=False)
    @classmethod
    def _check_targets(cls, value: str | list[str]) -> list[str]:
        return validate_targets(value)

    @field_validator("ignore", check_fields=False)
    @classmethod
    def _check_ignore(cls, value: list[str]) -> list[str]:
        return validate_ignore(value)

    @model_validator(mode="after")
    def _check_sparsity_matches_structure(self):
        self.sparsity = checked_sparsity(self.sparsity, self.mask_structure)
        return self

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

    @field_validator("fisher_samples", mode="before")
    @classmethod
    def _check_fisher_samples(cls, value: Any) -> int | None:
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise ValueError(
                f"fisher_samples must be a positive integer or None (all samples), got {value!r}"
            )
        return value

    def _check_finite_host_statistics(
        self, statistics: dict[torch.nn.Module, torch.Tensor], what: str
    ) -> None:
        """Raise naming the first layer whose host statistic (``what``, e.g. the
        Hessian) holds a NaN or inf, before this group of layers is pruned: the
        hosts would otherwise fall back to a magnitude-like mask without an error."""
        for module in self._num_samples:
            found = describe_non_finite(statistics[module])
            if found is not None:
                raise NonFiniteError(
                    f"the {what} of layer {self._module_names[module].rstrip('.')} holds {found}: "
                    "its calibration inputs were not finite (float16 activations can overflow: "
                    "load the model in float32 or bfloat16)"
                )

    def _fisher_statistic(self) -> str:
        """What the host consumes: "token_weights" (inputs reweighted during the
        host's own accumulation), "matrix" (d_in x d_in) or "diagonal"."""
        raise NotImplementedError

    def _gradient_pass_options(self) -> dict[str, Any]:
        """The host's extra keyword options of the gradient pass
        (:func:`collect_layer_statistics`): per-row Fisher factors, the
        diagonal's storage dtype; none by default."""
        return {}

    def on_initialize(self, state: State, **kwargs) -> bool:
        """The host's initialization, the checks of the model and the data,
        then the gradient pass (unless lam == 0). Nothing here changes a weight.
        Under torchrun the ranks' recipes and shards are checked first and the
        statistics reduced after (:mod:`~moonshot_plugins.llmcompressor.distributed`)."""
        self._check_ranks(state.data.calib)
        with raised_on_every_rank(f"{type(self).__name__} initialization"):
            target_layers = len(dict(match_named_modules(state.model, self.targets)))
            check_sparsity_list(self.sparsity, target_layers, self.targets)  # before the host's own, vaguer check
            initialized = super().on_initialize(state, **kwargs)
            self._check_model_and_data(state.model, state.data.calib)
        if self.taylor_weight != 0.0:  # a number > 0 or "auto"
            self._collect_layer_statistics(state.model, state.data.calib)
        return initialized

    def _check_ranks(self, dataloader) -> None:
        """Under torchrun: the same recipe and one calibration set split across
        the ranks (:func:`check_ranks_agree`), and a lam rule every rank can
        follow; raised on every rank."""
        if not is_distributed():
            return
        with raised_on_every_rank("reading the calibration data"):
            samples = calibration_sample_digests(dataloader)
        check_ranks_agree(type(self).__name__, self.model_dump(), samples)
        if self.taylor_weight == AUTO and self._fisher_statistic() != "token_weights":
            raise ValueError(
                f"{type(self).__name__} taylor_weight='auto' is not supported under torchrun: "
                "its per-layer rule reads every rank's per-position Fisher weights, which the "
                f"{self._fisher_statistic()!r} statistic does not keep; give a number in [0, 1]"
            )

    @contextlib.contextmanager
    def _compressed_across_ranks(self, *host_statistics: dict[torch.nn.Module, torch.Tensor]):
        """Around a host's ``compress_modules``: under torchrun each calibrated
        layer is compressed on one rank, from the host statistics of all
        ranks, and its weight then sent to every rank; the block sees only the
        layers of its own rank (:func:`reduce_to_owners`, :func:`broadcast_weights`)."""
        owners = reduce_to_owners(self._num_samples, host_statistics, [self._layer_statistics])
        with raised_on_every_rank(f"{type(self).__name__} compression"):
            yield
        if owners:
            broadcast_weights(owners)

    def _check_model_and_data(self, model: torch.nn.Module, dataloader) -> None:
        """Raise, naming what is wrong, before any weight changes: no layer
        selected, a width the N:M structure cannot tile, a non-finite weight,
        or empty calibration data."""
        modules = self._moonshot_modules()
        if not modules:
            raise ValueError(
                f"targets {self.targets!r} with ignore {self.ignore!r} select no layer to prune "
                "(Linear or Conv layers inside the targets); nothing was changed"
            )
        check_layer_widths(modules, self.mask_structure)
        check_finite_parameters(model.named_parameters())
        if dataloader is not None and hasattr(dataloader, "__len__") and len(dataloader) == 0:
            tokens = " of 2 or more tokens" if self.taylor_weight != 0.0 else ""
            raise ValueError(
                "calibration data is empty: the dataloader yields no samples; "
                f"{type(self).__name__} needs at least one calibration sample{tokens}"
            )

    def _check_taylor_only_layers_have_fisher(self) -> None:
        """At lam 1 a layer no gradient reached has no objective left, and the
        host would prune all of it. Checked on the statistics of all ranks,
        before the first layer is compressed, naming every such layer."""
        names = {module: name for name, module in self._moonshot_modules().items()}
        unreached = [
            names[module].rstrip(".") for module, record in self._layer_statistics.items()
            if record.taylor_weight == 1.0 and not record.reached_by_gradient()
        ]
        if unreached:
            raise ValueError(f"layers {unreached}: {ZERO_FISHER_TAYLOR_ONLY}; nothing was changed")

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
        with raised_on_every_rank(f"{type(self).__name__} gradient pass"):
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
                blocks=[
                    block for _, block in match_named_modules(model, self._sequential_targets)
                ],
                desc=f"{type(self).__name__} gradient pass",
                **self._gradient_pass_options(),
            )
        reduce_layer_statistics(self._layer_statistics, used, self.taylor_weight)
        self._check_taylor_only_layers_have_fisher()
        if statistic == "token_weights":
            self._token_reweighting = TokenReweighting(
                global_sampled_fraction(sampled_fraction(dataloader, used), used)
            )
