"""MOONSHOT channel importance for Torch-Pruning.

For every channel of a Torch-Pruning group, MOONSHOT mixes the reconstruction
error of removing the channel with its Optimal Brain Damage term; the math is
in :mod:`moonshot_plugins.core.channel_scores`. This adapter maps each of the
group's layers and Torch-Pruning handlers onto those functions: output-channel
handlers score output channels, input-channel handlers input channels, norm
handlers the affine weight. The Taylor term is Torch-Pruning's
``HessianImportance`` term for term (the same layers, the same handlers) with
the per-sample empirical Fisher diagonal.

Per-layer terms are reduced over the group with Torch-Pruning's own
``_reduce`` (``group_reduction``), separately for the two objectives. Each is
then divided by its scale over the group's channels (``objective_scale``),
mixed, and the mix is normalised with Torch-Pruning's ``_normalize``
(``normalizer``). Hence ``lam=1`` returns exactly what ``HessianImportance``
returns when its gradients hold the same Fisher, and ``lam=0`` is the
reconstruction criterion alone.

The statistics come from one calibration loop (:meth:`MoonshotImportance.calibrate`
or :meth:`MoonshotImportance.accumulate`): a forward pass feeds the input
moments, a backward pass of the summed per-sample losses feeds the Fisher
(both through :class:`moonshot_plugins.core.FisherCollector`).

Bookkeeping: after calibration each scored weight carries the original flat
index of each of its elements, and Torch-Pruning's pruning selects them along
with the weight (:mod:`~moonshot_plugins.torch_pruning.index_marks`), so after
any pruning the statistics are gathered for exactly the weights that remain.
The model's ``.grad`` is never touched. Call :meth:`MoonshotImportance.attach`
to mark an unpruned deep copy of the calibrated model.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator

import torch
from torch import nn

import torch_pruning as tp
from torch_pruning.pruner import function

from moonshot_plugins.core import (
    OBJECTIVE_SCALES,
    RECON_SCALES,
    FisherCollector,
    classification_sample_losses,
    depthwise_channel_errors,
    frozen_parameters,
    has_affine_weight,
    input_channel_errors,
    is_depthwise_conv,
    is_norm_layer,
    mixed_channel_scores,
    obd_input_channel_scores,
    obd_norm_channel_scores,
    obd_output_channel_scores,
    output_channel_errors,
    pooled_mean,
    relative_errors,
    run_gradient_pass,
    validate_fisher_mode,
)
from moonshot_plugins.torch_pruning.index_marks import index_marks, mark_indices
from moonshot_plugins.torch_pruning.options import (
    GROUP_REDUCTIONS,
    NORMALIZERS,
    RECON_TERMS,
    one_of,
    validate_lam,
    validate_normalizer,
)

__all__ = [
    "MoonshotImportance",
    "OBJECTIVE_SCALES",
    "RECON_SCALES",
    "RECON_TERMS",
    "GROUP_REDUCTIONS",
    "NORMALIZERS",
    "classification_sample_losses",
]


_OUT = (function.prune_conv_out_channels, function.prune_linear_out_channels)
_IN = (function.prune_conv_in_channels, function.prune_linear_in_channels)
_DEPTHWISE = (
    function.prune_depthwise_conv_out_channels,
    function.prune_depthwise_conv_in_channels,
)


def _scored_layer(module: nn.Module) -> bool:
    if is_norm_layer(module):
        return has_affine_weight(module)
    if isinstance(module, nn.Conv2d):
        return module.groups == 1 or is_depthwise_conv(module)
    return isinstance(module, nn.Linear)


class MoonshotImportance(tp.importance.GroupMagnitudeImportance):
    """MOONSHOT importance: reconstruction error mixed with OBD, per channel.

    Usable wherever Torch-Pruning takes an ``Importance`` (``MetaPruner``,
    ``BasePruner`` ``importance=``). Calibrate first::

        imp = MoonshotImportance(lam=0.5)
        imp.accumulate(model, loader)          # (inputs, labels) batches
        # or, with your own loss:
        with imp.calibrate(model):
            for x, y in loader:
                F.cross_entropy(model(x), y, reduction="sum").backward()
        pruner = tp.pruner.MetaPruner(model, example_inputs, importance=imp, ...)

    Inside :meth:`calibrate` the losses of the samples must be *summed* (not
    averaged), so that each sample's gradient is that of its own loss. A
    forward pass alone (no backward) is enough when ``lam == 0``.

    :param lam: weight of the Taylor/OBD objective in [0, 1]
    :param group_reduction: Torch-Pruning's reduction over the group's layers,
        one of :data:`GROUP_REDUCTIONS`
    :param normalizer: Torch-Pruning's normaliser, applied to the mixed score:
        one of :data:`NORMALIZERS`, ``"sentinel_q"`` (q in [0, 1)), a callable
        or None
    :param objective_scale: what each objective is divided by before mixing:
        "mean" or "median" of its channel scores in the group
    :param fisher_mode: "sample" (per-sample gradients, as OBD /
        ``HessianImportance``) or "token" (see :mod:`moonshot_plugins.core.collector`)
    :param recon_scale: "layer" (each layer's errors relative to its output
        energy) or "none" (raw squared errors)
    :param recon_terms: "all" (output- and input-channel errors) or "inputs"
        (only the errors in the consumers' outputs, i.e. input channels and
        depthwise channels: the output error of a layer followed by a norm
        layer is rescaled by that norm, so it says little about the network)
    :param target_types: layer types scored, as in Torch-Pruning
    """

    def __init__(
        self,
        lam: float = 0.5,
        group_reduction: str = "mean",
        normalizer: str = "mean",
        objective_scale: str = "mean",
        fisher_mode: str = "sample",
        recon_scale: str = "layer",
        recon_terms: str = "all",
        bias: bool = False,
        target_types: list = [nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.LayerNorm],
    ):
        self.lam = validate_lam(lam)
        self.fisher_mode = validate_fisher_mode(fisher_mode)
        if bias:
            raise ValueError("bias must be False: MOONSHOT scores weights only")
        self.objective_scale = one_of("objective_scale", objective_scale, OBJECTIVE_SCALES)
        self.recon_scale = one_of("recon_scale", recon_scale, RECON_SCALES)
        self.recon_terms = one_of("recon_terms", recon_terms, RECON_TERMS)
        self.group_reduction = one_of("group_reduction", group_reduction, GROUP_REDUCTIONS)
        self.normalizer = validate_normalizer(normalizer)
        self.bias = False
        self.target_types = list(target_types)
        self.p = 2
        self.reset()

    # -- calibration -----------------------------------------------------------
    def reset(self) -> None:
        """Forget all calibration statistics."""
        self._names: dict[int, str] = {}  # id(module) -> name in the calibrated model
        self._moments: dict[str, torch.Tensor] = {}
        self._fishers: dict[str, torch.Tensor] = {}
        self._shapes: dict[str, torch.Size] = {}
        self._num_samples = 0
        self._has_fisher = False

    @property
    def calibrated(self) -> bool:
        return bool(self._moments) or self._has_fisher

    def _layers(self, model: nn.Module) -> dict[str, nn.Module]:
        return {
            name: m
            for name, m in model.named_modules()
            if isinstance(m, tuple(self.target_types)) and _scored_layer(m)
        }

    @contextmanager
    def calibrate(self, model: nn.Module) -> Iterator["MoonshotImportance"]:
        """Collect statistics from the forward/backward passes run inside.

        Puts the model in eval mode and freezes its parameters for the
        duration (only activation gradients are needed); both are restored.
        On exit the statistics are stored and the model is marked for
        :meth:`__call__` (see the module docstring). Statistics add up over
        several ``calibrate`` blocks until :meth:`reset`.
        """
        layers = self._layers(model)
        if not layers:
            raise ValueError(
                f"model has no layer of target_types {[t.__name__ for t in self.target_types]}"
            )
        collector = FisherCollector(
            layers,
            fisher_mode=self.fisher_mode,
            matrix=False,
            diagonal=self.lam > 0,
            input_moments=True,
            grouped_convs=True,
            norm_layers=True,
            sample_rows=True,
        )
        was_training = model.training
        model.eval()
        try:
            with frozen_parameters(model), collector:
                yield self
        finally:
            model.train(was_training)
        collector.check_finite()
        self._store(layers, collector)
        self.attach(model)

    def accumulate(
        self,
        model: nn.Module,
        batches: Iterable[Any],
        sample_losses: Callable[[nn.Module, Any], torch.Tensor] = classification_sample_losses,
        max_samples: int | None = None,
    ) -> int:
        """One calibration loop over ``batches``; returns the samples used.

        :param sample_losses: (model, batch) -> per-sample losses (B,); the
            default is cross-entropy on ``(inputs, labels)`` batches
        """
        with self.calibrate(model):
            if self.lam == 0:  # moments only: forward passes suffice
                used = 0
                with torch.no_grad():
                    for batch in batches:
                        if max_samples is not None and used >= max_samples:
                            break
                        inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
                        if max_samples is not None:
                            inputs = inputs[: max_samples - used]
                        model(inputs)
                        used += inputs.shape[0]
            else:
                # calibrate() has entered the collector and frozen the parameters
                # already, so the gradient pass gets a context that does nothing
                used = run_gradient_pass(
                    model, batches, nullcontext(), sample_losses, max_samples,
                    desc="MOONSHOT calibration",
                )
        return used

    def _store(self, layers: dict[str, nn.Module], collector: FisherCollector) -> None:
        seen_any = False
        for name, layer in layers.items():
            self._shapes[name] = layer.weight.shape
            if not is_norm_layer(layer) and collector.num_moment_samples[name] > 0:
                moment = collector.input_moment(name)
                n_new = collector.num_moment_samples[name]
                self._moments[name] = pooled_mean(self._moments.get(name), moment, self._num_samples, n_new)
                seen_any = True
            if collector.diagonal and collector.num_samples[name] > 0:
                fisher = collector.diagonal_fisher(name).reshape(layer.weight.shape)
                n_new = collector.num_samples[name]
                self._fishers[name] = pooled_mean(self._fishers.get(name), fisher, self._num_samples, n_new)
                self._has_fisher = True
                seen_any = True
        if seen_any:
            counts = [c for c in collector.num_moment_samples.values() if c] or [
                c for c in collector.num_samples.values() if c
            ]
            self._num_samples += max(counts)

    def attach(self, model: nn.Module) -> None:
        """Mark an unpruned ``model`` (the calibrated one or a deep copy) for scoring.

        Gives each scored weight its original flat indices (pruned along with
        the weight, :mod:`~moonshot_plugins.torch_pruning.index_marks`) and
        maps the model's layers to the calibrated statistics by name.
        """
        if not self.calibrated:
            raise RuntimeError("MoonshotImportance has no calibration data: run calibrate()/accumulate() first")
        self._names = {}
        for name, layer in self._layers(model).items():
            if name not in self._shapes:
                continue
            if layer.weight.shape != self._shapes[name]:
                raise ValueError(
                    f"layer {name!r} has weight shape {tuple(layer.weight.shape)}, calibrated as "
                    f"{tuple(self._shapes[name])}: attach() needs the unpruned model"
                )
            mark_indices(layer.weight)
            self._names[id(layer)] = name

    def with_lam(self, lam: float) -> "MoonshotImportance":
        """A copy scoring with another ``lam``, sharing these statistics.

        Needs the Fisher (calibrated with lam > 0) when ``lam > 0``. Call
        :meth:`attach` on the model it will prune.
        """
        other = copy.copy(self)
        other.lam = validate_lam(lam)
        other._names = dict(self._names)
        return other

    # -- scoring ---------------------------------------------------------------
    def _current(self, layer: nn.Module) -> tuple[str, torch.Tensor] | None:
        name = self._names.get(id(layer))
        if name is None:
            return None
        marks = index_marks(layer.weight)
        if marks is None or marks.shape != layer.weight.shape:
            raise RuntimeError(
                f"layer {name!r} lost its MOONSHOT index marks (its weight was replaced "
                "outside Torch-Pruning); call attach() on the unpruned model or calibrate again"
            )
        return name, marks.long()

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor | None:
        if not self.calibrated:
            raise RuntimeError(
                "MoonshotImportance was called before any calibration data was seen: "
                "run imp.calibrate(model) / imp.accumulate(model, batches) first"
            )
        if self.lam > 0 and not self._has_fisher:
            raise RuntimeError(
                f"lam={self.lam} needs the Fisher, but calibration ran without gradients "
                "(calibrate with lam > 0 and a backward pass)"
            )
        recon_imp, recon_idxs, taylor_imp, taylor_idxs = [], [], [], []
        for i, (dep, idxs) in enumerate(group):
            idxs.sort()
            layer = dep.target.module
            prune_fn = dep.handler
            root_idxs = group[i].root_idxs
            if not isinstance(layer, tuple(self.target_types)):
                continue
            marked = self._current(layer)
            if marked is None:
                continue
            name, index = marked
            if self.lam < 1:
                local = self._recon(name, layer, prune_fn, index)
                if local is not None:
                    recon_imp.append(local[idxs])
                    recon_idxs.append(root_idxs)
            if self.lam > 0:
                local = self._taylor(name, layer, prune_fn, index, idxs)
                if local is not None:
                    taylor_imp.append(local)
                    taylor_idxs.append(root_idxs)
        if not recon_imp and not taylor_imp:
            return None  # no prunable weights in this group, as Torch-Pruning does
        recon = self._reduce(recon_imp, recon_idxs) if recon_imp else None
        taylor = self._reduce(taylor_imp, taylor_idxs) if taylor_imp else None
        if self.lam == 1.0 or recon is None:
            return self._normalize(taylor, self.normalizer)
        if self.lam == 0.0 or taylor is None:
            return self._normalize(recon, self.normalizer)
        mix = mixed_channel_scores(recon, taylor, self.lam, self.objective_scale)
        return self._normalize(mix, self.normalizer)

    def _taylor(self, name, layer, prune_fn, index, idxs) -> torch.Tensor | None:
        """HessianImportance's local term with h = the Fisher of the remaining weights."""
        fisher = self._fishers.get(name)
        if fisher is None:
            return None
        h = fisher.flatten().to(layer.weight.device)[index.flatten()].view(layer.weight.shape)
        w = layer.weight.detach()
        transposed = getattr(layer, "transposed", False)
        if prune_fn in _OUT:
            return obd_output_channel_scores(w, h, idxs, transposed)
        if prune_fn in _IN:
            local = obd_input_channel_scores(w, h, transposed)
            if prune_fn == function.prune_conv_in_channels and layer.groups != layer.in_channels and layer.groups != 1:
                local = local.repeat(layer.groups)
            return local[idxs]
        if prune_fn in (function.prune_batchnorm_out_channels, function.prune_layernorm_out_channels):
            return obd_norm_channel_scores(w, h, idxs)
        return None

    def _recon(self, name, layer, prune_fn, index) -> torch.Tensor | None:
        """Reconstruction error of removing each channel of this layer's pruned dim (full length)."""
        moment = self._moments.get(name)
        if moment is None or is_norm_layer(layer):
            return None
        w = layer.weight.detach().float()
        moment = moment.to(w.device)
        if is_depthwise_conv(layer):
            if prune_fn not in _DEPTHWISE + _OUT + _IN:
                return None
            channels = index.flatten(1)[:, 0] // index[0].numel()  # original channel of each row
            errors = depthwise_channel_errors(w.flatten(1), moment[channels])
            return relative_errors(errors, errors.sum(), self.recon_scale)
        if isinstance(layer, nn.Conv2d) and layer.groups != 1:
            return None
        wf = w.flatten(1)  # (d_out, d_in) with d_in = C_in * kh * kw
        d_in_orig = self._shapes[name][1:].numel()
        cols = index.flatten(1)[0] % d_in_orig  # original input column of each current column
        m = moment[cols][:, cols]
        energy = output_channel_errors(wf, m)
        if prune_fn in _OUT:
            return relative_errors(energy, energy.sum(), self.recon_scale) if self.recon_terms == "all" else None
        if prune_fn in _IN:
            errors = input_channel_errors(wf, m, w.shape[1])
            return relative_errors(errors, energy.sum(), self.recon_scale)
        return None

