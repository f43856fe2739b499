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
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
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
    "run_gradient_pass",
    "standardized_weight",
    "restore_weight",
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


def _check_supported(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
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
    """

    def __init__(
        self,
        modules: Mapping[str, nn.Module],
        fisher_mode: str = "token",
        matrix: bool = True,
        diagonal: bool = False,
        offload: bool = False,
    ):
        self.fisher_mode = validate_fisher_mode(fisher_mode)
        if not (matrix or diagonal):
            raise ValueError("FisherCollector needs matrix=True or diagonal=True")
        for module in modules.values():
            _check_supported(module)
        self.modules = dict(modules)
        self.matrix = matrix
        self.diagonal = diagonal
        self.offload = offload
        self.num_samples: dict[str, int] = {name: 0 for name in self.modules}
        self._matrix_acc: dict[str, torch.Tensor] = {}
        self._diag_acc: dict[str, torch.Tensor] = {}
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
        def hook(module: nn.Module, args: tuple, output: torch.Tensor):
            if not torch.is_grad_enabled():
                return None
            x = layer_inputs(module, args[0].detach())
            if not output.requires_grad:
                # With frozen weights, the first layers' inputs carry no grad;
                # making the output a leaf lets the gradient reach it.
                output = output.detach().requires_grad_(True)
            output.register_hook(
                lambda g: self._accumulate(name, module, x, g.detach())
            )
            return output

        return hook

    def _accumulate(
        self, name: str, module: nn.Module, x: torch.Tensor, g: torch.Tensor
    ) -> None:
        x = x.to(FISHER_PRECISION)
        d = layer_output_grads(module, g).to(FISHER_PRECISION)
        self.num_samples[name] += x.shape[0]
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

    def pop(self, name: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Return (matrix, diagonal) for ``name`` and free the accumulators."""
        matrix = self.fisher(name) if self.matrix else None
        diagonal = self.diagonal_fisher(name) if self.diagonal else None
        self._matrix_acc.pop(name, None)
        self._diag_acc.pop(name, None)
        return matrix, diagonal


def causal_lm_sample_losses(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean next-token negative log-likelihood of each sample: (B,).

    Padding (attention_mask == 0) is excluded from both the sum and the count,
    so a padded sample's gradient equals that of the same sample unpadded.
    """
    shift_logits = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    nll = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        targets.reshape(-1),
        reduction="none",
    ).view(targets.shape)
    if attention_mask is None:
        return nll.mean(dim=1)
    mask = attention_mask[:, 1:].to(nll.dtype)
    return (nll * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


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


def run_gradient_pass(
    model: nn.Module,
    batches: Iterable[Any],
    collector: FisherCollector,
    sample_losses: Callable[[nn.Module, Any], torch.Tensor],
    max_samples: int | None = None,
    desc: str = "MOONSHOT gradient pass",
) -> int:
    """One forward and one activation-only backward per batch, feeding ``collector``.

    :param sample_losses: (model, batch) -> per-sample losses (B,). Summing them
        makes each sample's output gradient that of its own loss, independent of
        how samples are batched.
    :param max_samples: stop after this many samples (whole batches are
        truncated to fit); None = all batches
    :return: number of samples used
    """
    used = 0
    was_training = model.training
    model.eval()
    total = None
    if hasattr(batches, "__len__"):
        total = len(batches)  # batches, not samples; only for the progress bar
    try:
        with frozen_parameters(model), collector, torch.enable_grad():
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
