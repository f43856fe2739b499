"""Per-row empirical Fisher of a linear layer as low-rank factors.

For a layer y = x W^T (W: d_out x d_in) and calibration sample i with T
positions, X_i (T x d_in) is the layer input and D_i (T x d_out) the gradient of
the sample's loss with respect to the layer output, so the sample's weight
gradient is G_i = D_i^T X_i (d_out x d_in). Row j's empirical Fisher over N
samples is

    F_j = (1/N) sum_i g_ij g_ij^T,   g_ij = row j of G_i (d_in,),

of rank <= N. It is kept as factors U (d_out, d_in, N) with U[j] = [g_1j ... g_Nj]
/ sqrt(N), so F_j = U_j U_j^T, and applied as U_j (U_j^T v_j) for all rows with
two batched products (:func:`row_fisher_matvec`); the d_in x d_in matrix of a
row is never formed.

Memory: d_out * d_in * N floats, i.e. exactly N copies of the weight (for a
576 x 1536 layer and N = 32 samples: 28 M floats, 113 MB in fp32), against
d_out * d_in^2 for the explicit per-row matrices (576 copies there). To cap
memory and the matvec cost independently of N, the builder can keep a
Gaussian sketch of rank k < N over the sample dimension:
U = G Omega / sqrt(N) with Omega (N x k) of i.i.d. N(0, 1/k) entries, so that
E[U_j U_j^T] = F_j (unbiased), at k copies of the weight (k = 8: 28 MB for
that layer). Each sample is added as it arrives (Omega's row is drawn then),
and the exact columns are kept until the (k+1)-th sample, so a rank-k builder
holds at most k copies of the weight between batches (3k for the moment it
switches to the sketch) and is exact when N <= k.
"""

from __future__ import annotations

import torch

__all__ = ["RowFisherBuilder", "row_fisher_matvec"]


def row_fisher_matvec(factors: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """F_j v_j = U_j (U_j^T v_j) for every row j.

    :param factors: U, (d_out, d_in, k)
    :param vectors: v, (d_out, d_in)
    :return: (d_out, d_in), in units of F times units of v
    """
    coefficients = torch.bmm(vectors.unsqueeze(1), factors)  # (d_out, 1, k)
    return torch.bmm(factors, coefficients.transpose(1, 2)).squeeze(-1)


class RowFisherBuilder:
    """Accumulate the per-row Fisher factors U (d_out, d_in, k) of one layer.

    Feed every calibration sample once with :meth:`add`, then take
    :meth:`factors` once. The number of samples N need not be known in
    advance: the 1/sqrt(N) is applied when the factors are taken.

    :param d_out: output features; :param d_in: input features
    :param rank: None for the exact factors (k = N, N copies of the weight),
        or a cap k on the columns: the exact factors while N <= k, a rank-k
        Gaussian sketch once more samples arrive (k copies of the weight)
    :param dtype: factor dtype (fp32; fp64 for tests)
    :param device: where the factors live (e.g. the CPU while gradients
        arrive on an accelerator); each batch's gradients are formed on the
        inputs' device and moved there
    :param seed: seed of the sketch's random matrix
    """

    def __init__(
        self,
        d_out: int,
        d_in: int,
        rank: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        seed: int = 0,
    ) -> None:
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ValueError(f"rank must be a positive integer or None (exact), got {rank!r}")
        self.shape = (d_out, d_in)
        self.rank = rank
        self.count = 0
        self._dtype = dtype
        self._device = torch.device("cpu") if device is None else torch.device(device)
        self._columns: list[torch.Tensor] = []  # exact: (d_out, d_in, B) per batch
        self._sketch: torch.Tensor | None = None  # (d_out * d_in, k) once N > k
        self._generator = torch.Generator(device="cpu").manual_seed(seed)

    @torch.no_grad()
    def add(self, inputs: torch.Tensor, output_grads: torch.Tensor) -> None:
        """Add a batch of samples.

        :param inputs: X, (B, T, d_in), or (T, d_in) for one sample
        :param output_grads: D, (B, T, d_out), or (T, d_out); gradient of each
            sample's own loss with respect to the layer output
        """
        if inputs.dim() == 2:
            inputs, output_grads = inputs.unsqueeze(0), output_grads.unsqueeze(0)
        self.add_gradients(output_grads.to(self._dtype).transpose(1, 2) @ inputs.to(self._dtype))

    @torch.no_grad()
    def add_gradients(self, grads: torch.Tensor) -> None:
        """Add a batch of samples by their weight gradients G_i = D_i^T X_i.

        :param grads: (B, d_out, d_in), any device
        """
        if self._generator is None:
            raise RuntimeError("the factors were already taken")
        grads = grads.to(device=self._device, dtype=self._dtype)
        self.count += grads.shape[0]
        if self._sketch is None and (self.rank is None or self.count <= self.rank):
            self._columns.append(grads.permute(1, 2, 0))
            return
        if self._sketch is None:  # the first sample past k: sketch the exact columns so far
            self._sketch = torch.zeros(grads[0].numel(), self.rank, dtype=self._dtype, device=self._device)
            if self._columns:
                self._project(torch.cat(self._columns, dim=-1).permute(2, 0, 1))
                self._columns.clear()
        self._project(grads)

    def _project(self, grads: torch.Tensor) -> None:
        """sketch += vec(G_i) omega_i^T for each sample i; omega_i ~ N(0, I / k)."""
        omega = torch.randn(grads.shape[0], self.rank, generator=self._generator, dtype=self._dtype)
        omega = omega.to(self._device) / self.rank**0.5
        self._sketch.addmm_(grads.reshape(grads.shape[0], -1).T, omega)

    def factors(self) -> torch.Tensor:
        """U, (d_out, d_in, min(N, k)), with F_j = U_j U_j^T (exact while
        N <= k, in expectation for a sketch); hands over the storage, so
        it is taken once.

        Units: (loss / weight) per sample, so U_j U_j^T is the Fisher's.
        """
        if self.count == 0:
            raise ValueError("no sample was added")
        if self._generator is None:
            raise RuntimeError("the factors were already taken")
        if self._sketch is None:
            factors = torch.cat(self._columns, dim=-1) if len(self._columns) > 1 else self._columns[0].contiguous()
        else:
            factors = self._sketch.reshape(*self.shape, self.rank)
        self._columns, self._sketch, self._generator = [], None, None
        return factors.div_(self.count**0.5)
