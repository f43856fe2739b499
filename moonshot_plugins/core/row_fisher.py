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
576 x 1536 layer and N = 128 samples: 113 M floats, 453 MB in fp32), against
d_out * d_in^2 for the explicit per-row matrices (576 copies there). One layer is
built at a time. To cap memory and the matvec cost independently of N, the
builder can keep a Gaussian sketch of rank k < N over the sample dimension:
U = G Omega / sqrt(N) with Omega (N x k) of i.i.d. N(0, 1/k) entries, so that
E[U_j U_j^T] = F_j (unbiased), at k copies of the weight. Each sample is added
as it arrives (Omega's row is drawn then), so neither mode ever holds more
than the factors plus one batch of gradients.
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

    Feed every calibration sample once with :meth:`add`, then read
    :meth:`factors`. Exact (k = N) unless ``rank`` asks for a sketch.

    :param d_out: output features; :param d_in: input features
    :param num_samples: N, the number of samples that will be added
    :param rank: k < N for a Gaussian sketch over samples (memory k copies of
        the weight), None for the exact factors (N copies)
    :param dtype: factor dtype (fp32; fp64 for tests)
    :param device: where the factors live
    :param seed: seed of the sketch's random matrix
    """

    def __init__(
        self,
        d_out: int,
        d_in: int,
        num_samples: int,
        rank: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        seed: int = 0,
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if rank is not None and not 1 <= rank < num_samples:
            raise ValueError(f"rank must be in [1, {num_samples}) or None, got {rank}")
        self.num_samples = num_samples
        self.rank = rank
        self.count = 0
        width = num_samples if rank is None else rank
        self._factors = torch.zeros(d_out, d_in, width, dtype=dtype, device=device)
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
        batch = inputs.shape[0]
        if self.count + batch > self.num_samples:
            raise ValueError(f"more than num_samples={self.num_samples} samples added")
        dtype = self._factors.dtype
        grads = output_grads.to(dtype).transpose(1, 2) @ inputs.to(dtype)  # (B, d_out, d_in)
        grads = grads / self.num_samples**0.5
        if self.rank is None:
            self._factors[:, :, self.count : self.count + batch] = grads.permute(1, 2, 0)
        else:
            sketch = torch.randn(batch, self.rank, generator=self._generator, dtype=dtype)
            sketch = sketch.to(self._factors.device) / self.rank**0.5
            self._factors += torch.einsum("bjd,bk->jdk", grads, sketch)
        self.count += batch

    def factors(self) -> torch.Tensor:
        """U, (d_out, d_in, k), with F_j = U_j U_j^T (in expectation for a sketch).

        Units: (loss / weight) per sample, so U_j U_j^T is the Fisher's.
        """
        if self.count != self.num_samples:
            raise ValueError(f"{self.count} samples added, expected {self.num_samples}")
        return self._factors
