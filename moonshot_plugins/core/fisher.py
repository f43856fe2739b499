"""Empirical Fisher statistics of layer weights, collected with hooks.

For a layer ``y = x W^T`` (W: d_out x d_in) and one calibration sample i with
T positions, let X_i (T x d_in) be the layer input and D_i (T x d_out) the
gradient of that sample's loss with respect to the layer output. The weight
gradient of the sample is G_i = D_i^T X_i (d_out x d_in). Over N samples:

* ``fisher_mode="sample"``: F = (1/N) sum_i G_i^T G_i / d_out
  (the per-sample empirical Fisher of each output row, averaged over rows);
* ``fisher_mode="token"``:  F = (1/N) sum_{i,t} ||d_{i,t}||^2 x_{i,t} x_{i,t}^T / d_out
  (every position a rank-one sample; exactly the cost of the host's X^T X).

Both are d_in x d_in, the shape of SparseGPT's row-shared Hessian. The
per-weight diagonal (d_out x d_in), for hosts whose objective is diagonal, is
(1/N) sum_i G_i**2 ("sample") or (1/N) sum_{i,t} d_{i,t}**2 x_{i,t}**2 ("token").

Weights are always in the standardised orientation (d_out x d_in): Conv2d is
flattened over (C_in, kh, kw) and transformers' Conv1D is transposed, as the
LLM Compressor hosts do.

Only activation gradients are needed, so the gradient pass freezes every
parameter: autograd then skips all weight-gradient matmuls and the pass costs
about one forward plus one activation-only backward.

Opt-in extensions (all off by default), used by the Torch-Pruning adapter:

* ``input_moments=True`` also accumulates the input second moment
  M = (1/N) sum_i X_i^T X_i (d_in x d_in) in the forward hook, so it is
  gathered by forward passes alone (no backward needed), with or without grad;
* ``grouped_convs=True`` accepts Conv2d with groups > 1 (depthwise included)
  for the diagonal Fisher (C_out x C_in/groups*kh*kw, the flattened weight's
  shape) and the input moments, which are then per group:
  (groups, d_g, d_g) with d_g = C_in/groups*kh*kw;
* ``norm_layers=True`` accepts BatchNorm (timm's BatchNormAct2d included: the
  fused activation is differentiated through) and LayerNorm, whose affine
  weight gamma gets a per-channel diagonal Fisher (C,): per-sample gradient
  g_i = sum_t d_{i,t} * xhat_{i,t} with xhat the normalised input;
* ``sample_rows=True`` reads a 2-D layer input (batch, features) as one
  sample per row (a classifier head after pooling) instead of one sample
  of many positions (the default, for flattened token batches).

Used by the LLM Compressor adapter:

* ``token_weights=True`` keeps, instead of a d_in x d_in matrix, the token
  Fisher's per-position weights w_{i,t} = ||d_{i,t}||^2 / d_out of every sample
  (T floats per sample and layer) plus the two energies that fix its scale,
  A = sum_{i,t} ||x_{i,t}||^2 and B = sum_{i,t} w_{i,t} ||x_{i,t}||^2. The token
  Fisher of *any* inputs of the same positions is then sum_t w_t x_t x_t^T, so a
  host can fold it into its own X^T X accumulation by reweighting its inputs
  (see :func:`moonshot_plugins.core.objective.token_objective_weights`), with
  no d_in x d_in matrix kept per layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from functools import partial
from typing import Any, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

try:  # transformers is optional for the core; Conv1D only exists there
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()

__all__ = [
    "FISHER_MODES",
    "FisherMode",
    "FisherCollector",
    "layer_inputs",
    "layer_output_grads",
    "causal_lm_sample_losses",
    "chunked_causal_lm_sample_losses",
    "run_gradient_pass",
    "activation_checkpointing",
    "standardized_weight",
    "restore_weight",
    "is_norm_layer",
]

FisherMode = Literal["sample", "token"]
FISHER_MODES: tuple[str, ...] = ("sample", "token")
FISHER_PRECISION = torch.float32


def validate_fisher_mode(fisher_mode: str) -> str:
    if fisher_mode not in FISHER_MODES:
        raise ValueError(
            f"fisher_mode must be one of {list(FISHER_MODES)}, got {fisher_mode!r}"
        )
    return fisher_mode


def is_norm_layer(module: nn.Module) -> bool:
    """BatchNorm (any dimension, timm's BatchNormAct2d included) or LayerNorm."""
    return isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm))


def _check_supported(
    module: nn.Module, grouped_convs: bool = False, norm_layers: bool = False
) -> None:
    if norm_layers and is_norm_layer(module):
        affine = getattr(module, "affine", getattr(module, "elementwise_affine", False))
        if not affine or module.weight is None:
            raise ValueError(
                f"{type(module).__name__} has no affine weight, so it has no Fisher"
            )
        return
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 and not grouped_convs:
            raise ValueError(
                f"Fisher collection supports Conv2d with groups=1 only, got groups="
                f"{module.groups}; depthwise layers have no shared d_in x d_in Hessian"
            )
    elif not isinstance(module, (nn.Linear, Conv1D)):
        raise TypeError(
            f"Fisher collection supports nn.Linear, transformers Conv1D and "
            f"nn.Conv2d, got {type(module).__name__}"
        )


def layer_inputs(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Layer input as per-sample rows: (B, T, d_in).

    Linear/Conv1D: any (..., d_in) input; 2-D inputs count as one sample.
    Conv2d: (B, C_in, H, W) unfolded to (B, H'*W', C_in*kh*kw), the columns of
    the flattened weight.
    """
    if isinstance(module, nn.Conv2d):
        cols = F.unfold(
            x,
            module.kernel_size,
            dilation=module.dilation,
            padding=module.padding,
            stride=module.stride,
        )
        return cols.transpose(1, 2)
    if x.dim() == 2:
        return x.unsqueeze(0)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def layer_output_grads(module: nn.Module, g: torch.Tensor) -> torch.Tensor:
    """Gradient w.r.t. the layer output as per-sample rows: (B, T, d_out)."""
    if isinstance(module, nn.Conv2d):
        return g.flatten(2).transpose(1, 2)
    if g.dim() == 2:
        return g.unsqueeze(0)
    return g.reshape(g.shape[0], -1, g.shape[-1])


def standardized_weight(module: nn.Module) -> torch.Tensor:
    """A copy of the layer weight as (d_out, d_in), the orientation of the Fisher."""
    weight = module.weight.detach().clone()
    if isinstance(module, nn.Conv2d):
        return weight.flatten(1)
    if isinstance(module, Conv1D):
        return weight.T.contiguous()
    return weight


def restore_weight(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`standardized_weight`: the layer's own shape and dtype."""
    if isinstance(module, Conv1D):
        weight = weight.T
    return weight.reshape(module.weight.shape).to(module.weight.dtype)


def _out_features(module: nn.Module) -> int:
    if isinstance(module, Conv1D):
        return module.weight.shape[1]
    return module.weight.shape[0]


class FisherCollector:
    """Accumulate empirical Fisher statistics for a set of layers.

    Use as a context manager around forward/backward passes (or call
    :func:`run_gradient_pass`). Each backward through a registered layer adds
    one accumulation of cost O(T * d_in^2) ("token") or
    O(T * d_in * d_out + d_out * d_in^2) ("sample"), done as one matmul per
    layer per batch.

    :param modules: name -> layer (nn.Linear, transformers Conv1D, nn.Conv2d)
    :param fisher_mode: "sample" or "token" (see module docstring)
    :param matrix: accumulate the d_in x d_in row-averaged Fisher
    :param diagonal: accumulate the d_out x d_in per-weight diagonal Fisher
    :param offload: keep accumulators on the CPU between updates
    :param input_moments: also accumulate the input second moment (1/N) X^T X
        of every linear/conv layer in the forward hook (read with
        :meth:`input_moment`); forward passes alone suffice for it
    :param grouped_convs: accept Conv2d with groups > 1 (diagonal Fisher and
        input moments only; ``matrix`` must then be False)
    :param norm_layers: accept BatchNorm/LayerNorm layers with an affine
        weight (diagonal Fisher of gamma only; ``matrix`` must then be False)
    :param sample_rows: 2-D inputs (batch, features) hold one sample per row
    :param token_weights: keep the token Fisher's per-position weights
        ||d_t||^2 / d_out of every sample (read with :meth:`token_weights`)
        and the energies A and B (:meth:`token_energies`); Linear/Conv1D only
    """

    def __init__(
        self,
        modules: Mapping[str, nn.Module],
        fisher_mode: str = "token",
        matrix: bool = True,
        diagonal: bool = False,
        offload: bool = False,
        input_moments: bool = False,
        grouped_convs: bool = False,
        norm_layers: bool = False,
        sample_rows: bool = False,
        token_weights: bool = False,
    ):
        self.fisher_mode = validate_fisher_mode(fisher_mode)
        if token_weights and self.fisher_mode != "token":
            raise ValueError("token_weights=True needs fisher_mode='token'")
        if not (matrix or diagonal or input_moments or token_weights):
            raise ValueError("FisherCollector needs matrix=True or diagonal=True")
        for name, module in modules.items():
            _check_supported(module, grouped_convs=grouped_convs, norm_layers=norm_layers)
            if matrix and (is_norm_layer(module) or _groups(module) != 1):
                raise ValueError(
                    f"layer {name!r} ({type(module).__name__}) has no shared d_in x d_in "
                    "Fisher; pass matrix=False (diagonal=True and/or input_moments=True)"
                )
            if token_weights and not isinstance(module, (nn.Linear, Conv1D)):
                raise ValueError(
                    f"token_weights supports nn.Linear and transformers Conv1D, got "
                    f"{type(module).__name__} for layer {name!r}: a convolution's "
                    "unfolded columns mix positions, so its inputs cannot be reweighted"
                )
        self.modules = dict(modules)
        self.matrix = matrix
        self.diagonal = diagonal
        self.offload = offload
        self.input_moments = input_moments
        self.sample_rows = sample_rows
        self.keep_token_weights = token_weights
        self.num_samples: dict[str, int] = {name: 0 for name in self.modules}
        self.num_moment_samples: dict[str, int] = {name: 0 for name in self.modules}
        self._matrix_acc: dict[str, torch.Tensor] = {}
        self._diag_acc: dict[str, torch.Tensor] = {}
        self._moment_acc: dict[str, torch.Tensor] = {}
        self._token_weights: dict[str, list[torch.Tensor]] = {name: [] for name in self.modules}
        self._input_sums: dict[str, list[torch.Tensor]] = {name: [] for name in self.modules}
        self._energies: dict[str, torch.Tensor] = {}
        self._row_energies: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    # -- hooks ---------------------------------------------------------------
    def __enter__(self) -> "FisherCollector":
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._forward_hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _forward_hook(self, name: str) -> Callable:
        norm = is_norm_layer(self.modules[name])

        def hook(module: nn.Module, args: tuple, output: torch.Tensor):
            if self.input_moments and not norm:
                with torch.autocast(args[0].device.type, enabled=False):
                    self._accumulate_moments(name, module, args[0].detach())
            if not torch.is_grad_enabled() or not (
                self.matrix or self.diagonal or self.keep_token_weights
            ):
                return None
            if norm:
                x = _normalized_input(module, args[0].detach())
            else:
                x = self._inputs(module, args[0].detach())
                if self.keep_token_weights and not (self.matrix or self.diagonal):
                    # two numbers per position are all token weights need:
                    # holding them instead of x until backward saves memory
                    x = _position_summary(x)
            if not output.requires_grad:
                # With frozen weights, the first layers' inputs carry no grad;
                # making the output a leaf lets the gradient reach it.
                output = output.detach().requires_grad_(True)
            output.register_hook(partial(self._accumulate_full_precision, name, module, x))
            return output

        return hook

    def _inputs(self, module: nn.Module, inp: torch.Tensor) -> torch.Tensor:
        if self.sample_rows and inp.dim() == 2 and not isinstance(module, nn.Conv2d):
            return inp.unsqueeze(1)
        return layer_inputs(module, inp)

    def _accumulate_moments(self, name: str, module: nn.Module, inp: torch.Tensor) -> None:
        x = self._inputs(module, inp).to(FISHER_PRECISION)
        self.num_moment_samples[name] += x.shape[0]
        groups = _groups(module)
        if groups == 1:
            x2d = x.reshape(-1, x.shape[-1])
            self._add(self._moment_acc, name, x2d.T @ x2d)
        else:
            xg = x.reshape(-1, groups, x.shape[-1] // groups)
            self._add(self._moment_acc, name, torch.einsum("tgi,tgj->gij", xg, xg))

    def _accumulate_full_precision(
        self, name: str, module: nn.Module, x: torch.Tensor, g: torch.Tensor
    ) -> None:
        # The gradient pass may run under autocast; the accumulators must not:
        # bf16 matmuls and sums of many small positive terms lose the small ones.
        with torch.autocast(g.device.type, enabled=False):
            self._accumulate(name, module, x, g.detach())

    def _accumulate(
        self, name: str, module: nn.Module, x: torch.Tensor, g: torch.Tensor
    ) -> None:
        if is_norm_layer(module):
            return self._accumulate_norm(name, module, x, g)
        x = x.to(FISHER_PRECISION)
        if self.sample_rows and g.dim() == 2 and not isinstance(module, nn.Conv2d):
            g = g.unsqueeze(1)
        d = layer_output_grads(module, g).to(FISHER_PRECISION)
        self.num_samples[name] += x.shape[0]
        if self.keep_token_weights:
            if not (self.matrix or self.diagonal):
                return self._keep_token_weights(name, x, d)  # x is the summary
            self._keep_token_weights(name, _position_summary(x), d)
        groups = _groups(module)
        if groups != 1:  # diagonal only (checked in __init__)
            b, t = x.shape[:2]
            xg = x.reshape(b, t, groups, -1)
            dg = d.reshape(b, t, groups, -1)
            if self.fisher_mode == "token":
                diag = torch.einsum("btgo,btgi->goi", dg.square(), xg.square())
            else:
                diag = torch.einsum("btgo,btgi->bgoi", dg, xg).square().sum(dim=0)
            self._add(self._diag_acc, name, diag.reshape(d.shape[-1], -1))
            return None
        if self.fisher_mode == "token":
            x2d, d2d = x.reshape(-1, x.shape[-1]), d.reshape(-1, d.shape[-1])
            if self.matrix:
                weights = d2d.square().sum(dim=1, keepdim=True)
                self._add(self._matrix_acc, name, (x2d * weights).T @ x2d)
            if self.diagonal:
                self._add(self._diag_acc, name, d2d.square().T @ x2d.square())
        else:
            grads = d.transpose(1, 2) @ x  # (B, d_out, d_in): one G_i per sample
            if self.matrix:
                rows = grads.reshape(-1, grads.shape[-1])
                self._add(self._matrix_acc, name, rows.T @ rows)
            if self.diagonal:
                self._add(self._diag_acc, name, grads.square().sum(dim=0))

    def _keep_token_weights(self, name: str, summary: torch.Tensor, d: torch.Tensor) -> None:
        """``summary``: (B, T, 2) from :func:`_position_summary`."""
        weights = d.square().sum(dim=-1) / d.shape[-1]  # (B, T)
        energy, sums = summary.to(FISHER_PRECISION).unbind(-1)  # (B, T) each
        update = torch.stack([energy.sum(), (weights * energy).sum()]).double()
        self._add(self._energies, name, update.cpu())
        # per output row i: sum_t d_ti^2 ||x_t||^2, the trace of row i's own token Fisher
        rows = torch.einsum("bt,bto->o", energy, d.square().to(FISHER_PRECISION))
        self._add(self._row_energies, name, rows.double().cpu())
        self._token_weights[name].extend(weights.cpu().unbind(0))
        # per-position input sums identify a sample when a later pass sees the
        # samples in another order (a shuffling dataloader)
        # (contiguous() copies the strided view, so the (B, T, 2) summary is freed)
        self._input_sums[name].extend(sums.contiguous().cpu().unbind(0))

    def _accumulate_norm(
        self, name: str, module: nn.Module, xhat: torch.Tensor, g: torch.Tensor
    ) -> None:
        """Diagonal Fisher of a norm layer's gamma; ``xhat`` is (B, T, C)."""
        act = _fused_activation(module)
        if act is not None:
            # timm's BatchNormAct2d: the hook saw act(bn(x)); move the gradient
            # back through the activation to the affine output z.
            with torch.enable_grad():
                z = _rows_to_layout(module, xhat, g) * _shaped(module.weight.detach(), g) + (
                    _shaped(module.bias.detach(), g) if module.bias is not None else 0.0
                )
                z = z.detach().requires_grad_(True)
                (g,) = torch.autograd.grad(act(z * 1.0), z, g)
        d = _norm_rows(module, g).to(FISHER_PRECISION)
        xhat = xhat.to(FISHER_PRECISION)
        self.num_samples[name] += xhat.shape[0]
        if self.fisher_mode == "token":
            diag = (d.square() * xhat.square()).sum(dim=(0, 1))
        else:
            diag = (d * xhat).sum(dim=1).square().sum(dim=0)
        self._add(self._diag_acc, name, diag)

    def _add(self, store: dict[str, torch.Tensor], name: str, update: torch.Tensor):
        if self.offload:
            update = update.cpu()
        if name in store:
            store[name] += update
        else:
            store[name] = update

    # -- results -------------------------------------------------------------
    def _num(self, name: str) -> int:
        n = self.num_samples[name]
        if n == 0:
            raise RuntimeError(
                f"No gradient reached layer {name!r}: run a forward and backward "
                "pass inside the collector before reading the Fisher"
            )
        return n

    def fisher(self, name: str) -> torch.Tensor:
        """Row-averaged empirical Fisher of layer ``name``: (d_in, d_in), fp32."""
        if not self.matrix:
            raise RuntimeError("collector was built with matrix=False")
        count = self._num(name) * _out_features(self.modules[name])
        return self._matrix_acc[name] / count

    def diagonal_fisher(self, name: str) -> torch.Tensor:
        """Per-weight diagonal empirical Fisher of layer ``name``: (d_out, d_in), fp32."""
        if not self.diagonal:
            raise RuntimeError("collector was built with diagonal=False")
        count = self._num(name)
        return self._diag_acc[name] / count

    def input_moment(self, name: str) -> torch.Tensor:
        """Input second moment (1/N) sum_i X_i^T X_i of layer ``name``, fp32.

        (d_in, d_in) for groups == 1, (groups, d_g, d_g) for grouped convs;
        N counts samples (sequence positions / pixels are summed).
        """
        if not self.input_moments:
            raise RuntimeError("collector was built with input_moments=False")
        if is_norm_layer(self.modules[name]):
            raise ValueError(f"layer {name!r} is a norm layer: it has no input moment")
        n = self.num_moment_samples[name]
        if n == 0:
            raise RuntimeError(
                f"No input reached layer {name!r}: run a forward pass inside the "
                "collector before reading its input moment"
            )
        return self._moment_acc[name] / n

    def token_weights(self, name: str) -> list[torch.Tensor]:
        """Token-Fisher weights ||d_t||^2 / d_out of layer ``name``: one (T_i,)
        fp32 CPU tensor per sample, in the order the samples were seen."""
        if not self.keep_token_weights:
            raise RuntimeError("collector was built with token_weights=False")
        self._num(name)
        return self._token_weights[name]

    def token_energies(self, name: str) -> tuple[float, float]:
        """(A, B): A = sum ||x_t||^2 and B = sum w_t ||x_t||^2 over every position
        seen by layer ``name`` (the mean-diagonal scales of X^T X and of the
        token Fisher, up to the same factor)."""
        if not self.keep_token_weights:
            raise RuntimeError("collector was built with token_weights=False")
        self._num(name)
        energy, weighted = self._energies[name].tolist()
        return energy, weighted

    def row_sensitivities(self, name: str) -> torch.Tensor:
        """(d_out,) fp32: each output row's token-Fisher trace
        sum_t d_ti^2 ||x_t||^2 over its mean across rows. The row-shared token
        Fisher averages the rows; row i's own is about s_i times that average."""
        if not self.keep_token_weights:
            raise RuntimeError("collector was built with token_weights=False")
        self._num(name)
        rows = self._row_energies[name]
        return (rows / rows.mean().clamp(min=torch.finfo(torch.float64).tiny)).float()

    def input_sums(self, name: str) -> list[torch.Tensor]:
        """Per-position sums of the input of layer ``name``, one (T_i,) fp32
        tensor per sample in order: a fingerprint that finds a sample again in
        a later pass over the same data in another order."""
        if not self.keep_token_weights:
            raise RuntimeError("collector was built with token_weights=False")
        return self._input_sums[name]

    def pop(self, name: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Return (matrix, diagonal) for ``name`` and free the accumulators."""
        matrix = self.fisher(name) if self.matrix else None
        diagonal = self.diagonal_fisher(name) if self.diagonal else None
        self._matrix_acc.pop(name, None)
        self._diag_acc.pop(name, None)
        return matrix, diagonal


def _position_summary(x: torch.Tensor) -> torch.Tensor:
    """(B, T, d_in) -> (B, T, 2) fp32: ||x_t||^2 and sum(x_t) of every position."""
    x = x.to(FISHER_PRECISION)
    return torch.stack([x.square().sum(dim=-1), x.sum(dim=-1)], dim=-1)


def _groups(module: nn.Module) -> int:
    return module.groups if isinstance(module, nn.Conv2d) else 1


def _fused_activation(module: nn.Module) -> Callable | None:
    """The activation timm fuses into BatchNormAct2d (with its drop), else None."""
    act = getattr(module, "act", None)
    if act is None or isinstance(act, nn.Identity):
        return None
    drop = getattr(module, "drop", None)
    return (lambda z: act(drop(z))) if drop is not None else act


def _normalized_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """xhat of a norm layer (its output before gamma/beta) as rows (B, T, C)."""
    if isinstance(module, nn.LayerNorm):
        xhat = F.layer_norm(x, module.normalized_shape, eps=module.eps)
        channels = module.weight.numel()
        return xhat.reshape(x.shape[0], -1, channels)
    use_batch = module.training or module.running_mean is None
    xhat = F.batch_norm(
        x, module.running_mean, module.running_var, None, None,
        training=use_batch, momentum=0.0, eps=module.eps,
    )
    return _norm_rows(module, xhat)


def _norm_rows(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """(B, C, *spatial) for BatchNorm or (B, ..., C) for LayerNorm -> (B, T, C)."""
    if isinstance(module, nn.LayerNorm):
        return t.reshape(t.shape[0], -1, module.weight.numel())
    if t.dim() == 2:
        return t.unsqueeze(1)
    return t.flatten(2).transpose(1, 2)


def _rows_to_layout(module: nn.Module, rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_norm_rows` into the shape of ``like``."""
    if isinstance(module, nn.LayerNorm) or like.dim() == 2:
        return rows.reshape(like.shape)
    return rows.transpose(1, 2).reshape(like.shape)


def _shaped(param: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-channel ``param`` broadcastable against a BatchNorm tensor ``like``."""
    return param.reshape(1, -1, *([1] * (like.dim() - 2)))


def causal_lm_sample_losses(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean next-token negative log-likelihood of each sample: (B,).

    Padding (attention_mask == 0) is excluded from both the sum and the count,
    so a padded sample's gradient equals that of the same sample unpadded.
    """
    targets, mask = _next_token_targets(input_ids, attention_mask)
    shift_logits = logits[:, :-1].float()
    nll = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        targets.reshape(-1),
        reduction="none",
    ).view(targets.shape)
    return (nll * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


def _next_token_targets(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets (B, T-1) and their fp32 weights (1 = counted, 0 = padding)."""
    targets = input_ids[:, 1:]
    if attention_mask is None:
        return targets, torch.ones_like(targets, dtype=torch.float32)
    return targets, attention_mask[:, 1:].float()


def chunked_causal_lm_sample_losses(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    chunk_size: int = 128,
) -> torch.Tensor:
    """:func:`causal_lm_sample_losses` of ``head(hidden)`` without holding the
    logits: each chunk of positions runs the head and the cross-entropy under
    activation checkpointing, so at most ``chunk_size`` positions of logits
    (B x chunk x vocab) exist at once, in forward and in backward.

    :param hidden: final hidden states (B, T, d_model)
    :param head: hidden -> logits (the output embedding)
    :return: mean next-token NLL of each sample, (B,)
    """
    from torch.utils.checkpoint import checkpoint

    targets, mask = _next_token_targets(input_ids, attention_mask)

    def chunk_nll(h: torch.Tensor, t: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        logits = head(h).float()
        nll = F.cross_entropy(logits.flatten(0, 1), t.flatten(), reduction="none")
        return (nll.view(t.shape) * m).sum(dim=1)

    total = hidden.new_zeros(hidden.shape[0], dtype=torch.float32)
    positions = targets.shape[1]
    for start in range(0, positions, chunk_size):
        stop = min(start + chunk_size, positions)
        total = total + checkpoint(
            chunk_nll,
            hidden[:, start:stop],
            targets[:, start:stop],
            mask[:, start:stop],
            use_reentrant=False,
        )
    return total / mask.sum(dim=1).clamp(min=1)


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Temporarily set requires_grad=False on every parameter (restored after)."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def _batch_size(batch: Any) -> int:
    """Leading dimension of the first tensor in a tensor, tuple/list or dict batch."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    items = batch.values() if isinstance(batch, Mapping) else batch
    return next(v for v in items if isinstance(v, torch.Tensor)).shape[0]


def release_freed_memory() -> None:
    """Hand memory freed by the allocator back to the OS (glibc ``malloc_trim``).

    A backward pass frees hundreds of MB of activations of many sizes; glibc
    keeps much of it in fragmented heap, so the process RSS ratchets up batch
    after batch. Trimming after each batch keeps the peak near one batch's
    worth, for a few ms. A no-op where glibc is not the allocator.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _find_malloc_trim() -> Callable[[int], int] | None:
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _find_malloc_trim()


@contextmanager
def activation_checkpointing(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Run each module under non-reentrant activation checkpointing: its
    internal activations are recomputed in backward instead of kept, so a
    gradient pass holds about one block's activations instead of all of them
    (one extra forward of the blocks). Hooks inside still see every forward;
    gradients flow through the original forward's outputs only, so tensor
    hooks registered during the recomputation never fire."""
    from torch.utils.checkpoint import checkpoint

    patched = []
    try:
        for module in modules:
            own = module.__dict__.get("forward")  # e.g. an offloading wrapper
            module.forward = partial(checkpoint, module.forward, use_reentrant=False)
            patched.append((module, own))
        yield
    finally:
        for module, own in patched:
            if own is None:
                del module.forward
            else:
                module.forward = own


def run_gradient_pass(
    model: nn.Module,
    batches: Iterable[Any],
    collector: FisherCollector,
    sample_losses: Callable[[nn.Module, Any], torch.Tensor],
    max_samples: int | None = None,
    desc: str = "MOONSHOT gradient pass",
    autocast_dtype: torch.dtype | None = None,
    checkpoint_modules: Iterable[nn.Module] = (),
) -> int:
    """One forward and one activation-only backward per batch, feeding ``collector``.

    :param sample_losses: (model, batch) -> per-sample losses (B,). Summing them
        makes each sample's output gradient that of its own loss, independent of
        how samples are batched.
    :param max_samples: stop after this many samples (whole batches are
        truncated to fit); None = all batches
    :param autocast_dtype: run the forward/backward matmuls under autocast in
        this dtype (e.g. torch.bfloat16: about 4x faster on CPUs with
        AVX512-BF16); the Fisher accumulators stay fp32. None = model dtype.
    :param checkpoint_modules: blocks (e.g. decoder layers) to run under
        :func:`activation_checkpointing`; same statistics, less memory
    :return: number of samples used
    """
    used = 0
    was_training = model.training
    model.eval()
    total = None
    if hasattr(batches, "__len__"):
        total = len(batches)  # batches, not samples; only for the progress bar
    device_type = next(model.parameters()).device.type
    autocast = torch.autocast(
        device_type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
    )
    try:
        with (
            frozen_parameters(model),
            activation_checkpointing(checkpoint_modules),
            collector,
            torch.enable_grad(),
            autocast,
        ):
            for batch in tqdm(batches, desc=desc, total=total, leave=False):
                size = _batch_size(batch)
                if max_samples is not None:
                    if used >= max_samples:
                        break
                    if used + size > max_samples:
                        batch = _truncate(batch, max_samples - used)
                        size = max_samples - used
                losses = sample_losses(model, batch)
                losses.sum().backward()
                del losses
                release_freed_memory()
                used += size
    finally:
        model.train(was_training)
    return used


def _truncate(batch: Any, n: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[:n]
    if isinstance(batch, (tuple, list)):
        return type(batch)(_truncate(b, n) for b in batch)
    return {k: (v[:n] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
