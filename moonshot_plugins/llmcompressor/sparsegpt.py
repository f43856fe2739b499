"""MoonshotSparseGPTModifier: LLM Compressor's SparseGPT on the MOONSHOT objective."""

from __future__ import annotations

import torch
from compressed_tensors.utils import align_module_device, update_offload_parameter
from loguru import logger
from pydantic import field_validator, model_validator

from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier

from moonshot_plugins.core import (
    ADMM_RHO,
    AUTO,
    combine_hessians,
    release_freed_memory,
    restore_weight,
    standardized_weight,
)
from moonshot_plugins.core.mask_structure import parse_mask_structure
from moonshot_plugins.llmcompressor.host_fields import validate_block_size, validate_dampening_frac
from moonshot_plugins.llmcompressor.mixin import MoonshotModifierMixin
from moonshot_plugins.llmcompressor.row_weights import scale_rows, unscale_rows
from moonshot_plugins.llmcompressor.weight_update import (
    DEFAULT_FISHER_ROW_RANK,
    LayerSnapshot,
    RowFisher,
    check_admm_rho,
    check_resolve_max_iters,
    updated_weight,
    validate_admm_rho,
    validate_fisher_row_rank,
    validate_fisher_rows,
    validate_resolve_max_iters,
    validate_weight_update,
)

__all__ = ["MoonshotSparseGPTModifier"]


class MoonshotSparseGPTModifier(MoonshotModifierMixin, SparseGPTModifier):
    """SparseGPT on the MOONSHOT objective (1-lam) recon + lam taylor.

    Per layer, the host's row-shared Hessian H = (2/n) X^T X becomes
    (1-lam) H + lam (s_H / s_F) F, with F a row-averaged empirical Fisher from
    the gradient pass and s the mean diagonal; SparseGPT's own solver (one
    Cholesky per layer) then runs unchanged on it. Where that happens depends
    on ``fisher_mode``:

    - "token" (the default): F = sum_t w_t x_t x_t^T, every position a
      rank-one sample. It shares the positions of X^T X, so ``calibrate_module``
      feeds the host sqrt(c_t) x_t with c_t = (1-lam) + lam (A/B) w_t / f
      (:func:`~moonshot_plugins.core.token_objective_weights`; A/B the ratio
      of the traces of X^T X and F, f the share of calibration samples the
      gradient pass used), and the host's own accumulation is the combined
      Hessian; samples outside the gradient pass (``fisher_samples``) get
      c = 1-lam.
      ``taylor_weight`` defaults to "auto" (a lam per layer).
    - "sample": F = per-sample gradient outer products, (d_in, d_in) per
      layer; ``compress_modules`` replaces the host's accumulated Hessian by
      :func:`~moonshot_plugins.core.combine_hessians` before the solver.
      ``taylor_weight`` defaults to 0.5.

    ``row_weights`` (default on for unstructured masks in token mode, off
    elsewhere): the row-shared Fisher averages the output rows, but row i's
    own token Fisher is about s_i times that average. Row i's objective is
    weighted by m_i = (1-lam_r) + lam_r s_i, applied by scaling row i by
    sqrt(m_i) around the host's unchanged solver, so an unstructured mask
    prunes insensitive rows harder; lam_r is the layer's lam capped by the
    ``auto`` rule applied to the rows (:func:`row_objective_weights`), so no
    row is pruned whole on a noisy estimate. ``row_weights: false`` gives the
    row-shared objective alone.

    ``weight_update`` (default "host"): what sets the weights after the sweep:
    the sweep itself, "resolve" (its mask, the kept weights re-solved to the
    objective's exact minimum) or "admm" (mask and weights searched by ADMM,
    then re-solved); see :mod:`~moonshot_plugins.llmcompressor.weight_update`.
    ``resolve_max_iters`` caps the re-solve's PCG iterations per layer (default
    None: 100, 300 with ``fisher_rows: per_row``); each costs one
    (d_out, d_in) x (d_in, d_in) product. ``admm_rho`` (default 0.1) is
    ADMM's initial penalty, relative to the mean curvature diagonal: larger
    settles the mask in fewer iterations (0.3: about half as many) and
    searches it less thoroughly.

    ``fisher_rows`` (default "shared"): the Fisher of the re-solve ("resolve",
    "admm"). "shared" is the sweep's own objective. "per_row" (needs
    ``fisher_mode: sample`` and ``weight_update`` "resolve" or "admm") gives
    each output row j its own empirical Fisher F_j = (1/N) sum_i g_ij g_ij^T
    (g_ij: row j of sample i's weight gradient) instead of the rows' average:
    row j minimises (1-lam) recon_j / s_rec + lam taylor_j / s_F with
    recon_j = dw_j^T H dw_j, H the host's plain (2/n) X^T X (sample mode never
    reweights it), taylor_j = dw_j^T F_j dw_j, and s_rec, s_F the mean
    diagonals of H and of the rows' average F (the normalisation of
    ``combine_hessians``), scaled by s_rec and damped as the sweep was. The
    sweep still runs on combine_hessians(H, F, lam), the rows' average of that
    objective (exactly, with exact factors): "resolve" keeps the sweep's mask
    of ``fisher_rows: shared`` and re-solves its kept weights row by row, "admm"
    also searches the mask on the per-row objective. lam = 0 gives no gradient
    pass and the same result as "shared". F_j is kept as
    factors U_j (d_in x k) from the gradient pass
    (:class:`~moonshot_plugins.core.row_fisher.RowFisherBuilder`):
    ``fisher_row_rank`` k (default 8) caps them by a Gaussian sketch over the
    samples (exact while N <= k; None: always exact, k = N). Memory: k copies
    of every pruned layer's weight at once, on the CPU, fp32, from the
    gradient pass until the layer is compressed (SmolLM2-135M at k = 8: about
    3.4 GB); each CG iteration of the re-solve adds two (d_out, d_in, k)
    batched products to its d_out x d_in x d_in one.

    Sample yaml:

    ```yaml
    sparsity_stage:
      sparsity_modifiers:
        MoonshotSparseGPTModifier:
          sparsity: 0.5
          mask_structure: "2:4"
          taylor_weight: auto       # or a fixed lam in [0, 1]
          fisher_mode: "token"
          weight_update: host       # or resolve, admm
          # resolve_max_iters: 100  # PCG cap of resolve / admm
          # admm_rho: 0.1           # initial ADMM penalty (weight_update: admm)
          fisher_rows: shared       # or per_row (fisher_mode: sample, weight_update: resolve or admm)
          targets: ["Linear"]
          ignore: ["re:.*lm_head"]
    ```

    All ``SparseGPTModifier`` fields apply (``sparsity_profile: owl``,
    ``block_size`` (a positive integer, a multiple of M under "N:M"),
    ``dampening_frac`` (a finite number >= 0) ...), plus ``taylor_weight``,
    ``fisher_mode``, ``fisher_samples``, ``offload_fisher`` and
    ``gradient_dtype`` (see :class:`MoonshotModifierMixin`).
    """

    taylor_weight: float | str = AUTO
    row_weights: bool = True
    weight_update: str = "host"
    fisher_rows: str = "shared"
    fisher_row_rank: int | None = DEFAULT_FISHER_ROW_RANK
    resolve_max_iters: int | None = None
    admm_rho: float = ADMM_RHO

    @field_validator("weight_update")
    @classmethod
    def _check_weight_update(cls, value: str) -> str:
        return validate_weight_update(value)

    @field_validator("fisher_rows")
    @classmethod
    def _check_fisher_rows(cls, value: str) -> str:
        return validate_fisher_rows(value)

    @field_validator("fisher_row_rank", mode="before")
    @classmethod
    def _check_fisher_row_rank(cls, value: object) -> int | None:
        return validate_fisher_row_rank(value)

    @field_validator("resolve_max_iters", mode="before")
    @classmethod
    def _check_resolve_max_iters(cls, value: object) -> int | None:
        return validate_resolve_max_iters(value)

    @field_validator("admm_rho", mode="before")
    @classmethod
    def _check_admm_rho(cls, value: object) -> float:
        return validate_admm_rho(value)

    @field_validator("block_size", mode="before")
    @classmethod
    def _check_block_size(cls, value: object) -> int:
        return validate_block_size(value)

    @field_validator("dampening_frac", mode="before")
    @classmethod
    def _check_dampening_frac(cls, value: object) -> float:
        return validate_dampening_frac(value)

    @model_validator(mode="after")
    def _check_blocks_hold_whole_groups(self):
        _, m = parse_mask_structure(self.mask_structure)
        if m and self.block_size % m:
            raise ValueError(
                f"block_size {self.block_size} must be a multiple of M = {m} under mask_structure "
                f"'{self.mask_structure}': SparseGPT picks each group of {m} inside one block of "
                "block_size columns, so a group straddling two blocks would be cut"
            )
        return self

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

    @model_validator(mode="after")
    def _check_resolve_applies(self):
        check_resolve_max_iters(self.weight_update, self.model_fields_set)
        check_admm_rho(self.weight_update, self.model_fields_set)
        return self

    @model_validator(mode="after")
    def _check_per_row_fisher(self):
        if self.fisher_rows == "shared":
            if "fisher_row_rank" in self.model_fields_set:
                raise ValueError(
                    "fisher_row_rank applies only with fisher_rows='per_row', got fisher_rows='shared'"
                )
            return self
        if self.weight_update not in ("resolve", "admm"):
            raise ValueError(
                "fisher_rows='per_row' needs weight_update 'resolve' or 'admm' (the sweep has one "
                f"Hessian for all rows; only the weight update can use one per row), got "
                f"weight_update={self.weight_update!r}"
            )
        if self.fisher_mode != "sample":
            raise ValueError(
                "fisher_rows='per_row' needs fisher_mode='sample' (the per-row Fisher is made of "
                "per-sample gradients, and the sweep uses its rows' average, the sample Fisher), "
                f"got fisher_mode={self.fisher_mode!r}"
            )
        return self

    def _fisher_statistic(self) -> str:
        return "token_weights" if self.fisher_mode == "token" else "matrix"

    def _gradient_pass_options(self) -> dict[str, object]:
        if self.fisher_rows == "shared":
            return {}
        return dict(row_factors=True, row_factor_rank=self.fisher_row_rank)

    def calibrate_module(
        self, module: torch.nn.Module, args: tuple[torch.Tensor, ...], _output: torch.Tensor
    ):
        """The host's Hessian accumulation; in token mode this is where the
        Hessian changes: the host accumulates the sqrt(c_t)-reweighted inputs
        (:class:`~moonshot_plugins.llmcompressor.token_reweighting.TokenReweighting`)."""
        statistics = self._layer_statistics.get(module)
        if statistics is not None and statistics.token_weights is not None:
            seen = self._num_samples.get(module, 0)  # samples the host already holds
            reweighted = self._token_reweighting.reweighted_input(module, args[0], statistics, seen)
            args = (reweighted, *args[1:])
        return super().calibrate_module(module, args, _output)

    def compress_modules(self):
        """The host's solver on every calibrated layer; in sample mode this is
        where the Hessian changes: it becomes ``combine_hessians(H, F, lam)``
        first. With ``row_weights``, rows are scaled by sqrt(m_i) around the
        solver; ``weight_update`` then replaces the sweep's weights. Under
        torchrun each layer is compressed on one rank from all ranks' Hessians
        (:meth:`~MoonshotModifierMixin._compressed_across_ranks`)."""
        with self._compressed_across_ranks(self._hessians):
            self._check_finite_host_statistics(self._hessians, "Hessian")
            row_roots = self._scale_rows() if self.row_weights else {}
            row_fishers = self._combine_fishers()
            snapshots = self._snapshot_layers(row_fishers) if self.weight_update != "host" else {}
            super().compress_modules()
            self._update_weights(snapshots)
            unscale_rows(row_roots)
            # After the gradient pass the allocator keeps each layer's freed buffers
            # in a fragmented heap: without this, anonymous memory grew by ~65 MB
            # per decoder layer (2:4 SmolLM2: peak 2.59 GB vs 1.24 GB with it).
            release_freed_memory()

    def _combine_fishers(self) -> dict[torch.nn.Module, RowFisher]:
        """Sample mode: each layer's Hessian becomes ``combine_hessians(H, F, lam)``.
        Returns, with ``fisher_rows: per_row``, what the re-solve needs of each layer."""
        row_fishers = {}
        for module in list(self._num_samples):
            statistics = self._layer_statistics.pop(module, None)  # done with this layer
            if statistics is None or statistics.fisher is None:
                continue
            with self._maybe_onload_hessian(module):
                if statistics.row_factors is not None:  # H before the Fisher joins it
                    row_fishers[module] = RowFisher(
                        self._hessians[module].float().clone(), statistics.fisher,
                        statistics.row_factors, statistics.taylor_weight,
                    )
                try:
                    self._hessians[module] = combine_hessians(
                        self._hessians[module], statistics.fisher, statistics.taylor_weight
                    )
                except ValueError as error:
                    raise ValueError(f"layer {self._module_names[module].rstrip('.')}: {error}") from error
        return row_fishers

    def _scale_rows(self) -> dict[torch.nn.Module, torch.Tensor]:
        """Scale the rows of the layers about to be pruned by sqrt(m_i); returns
        the factors to undo it (:func:`~moonshot_plugins.llmcompressor.row_weights.scale_rows`)."""
        return scale_rows(list(self._num_samples), self._layer_statistics)

    def _snapshot_layers(
        self, row_fishers: dict[torch.nn.Module, RowFisher]
    ) -> dict[torch.nn.Module, LayerSnapshot]:
        """Each layer's weight and Hessian just before the sweep (which consumes
        both), and its per-row Fisher if any."""
        snapshots = {}
        for module in self._num_samples:
            with torch.no_grad(), self._maybe_onload_hessian(module), align_module_device(module):
                snapshots[module] = LayerSnapshot(
                    standardized_weight(module).float().clone(),
                    self._hessians[module].float().clone(),
                    self._module_sparsities[module],
                    row_fishers.get(module),
                )
        return snapshots

    def _update_weights(self, snapshots: dict[torch.nn.Module, LayerSnapshot]) -> None:
        """Replace each swept layer's weights by ``weight_update``'s; each
        snapshot (with its per-row Fisher) is dropped once used."""
        for module in list(snapshots):
            snapshot = snapshots.pop(module)
            with torch.no_grad(), align_module_device(module):
                host = standardized_weight(module)
                new, before, after = updated_weight(
                    self.weight_update, snapshot, host.float(), self.dampening_frac,
                    self._prune_n, self._prune_m, self.resolve_max_iters, self.admm_rho,
                )
                pruned = restore_weight(module, new.to(host.dtype))
            update_offload_parameter(module, "weight", pruned)
            logger.info(
                f"MOONSHOT weight_update={self.weight_update} {self._module_names[module]}: "
                f"objective {before:.4g} -> {after:.4g}"
            )
