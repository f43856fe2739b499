"""Token mode of MOONSHOT SparseGPT: the Taylor term folded into the host's inputs.

The host accumulates X^T X from each layer's inputs. Feeding it sqrt(c_t) x_t
instead, with c_t from :func:`moonshot_plugins.core.token_objective_weights`,
makes that accumulation (1-lam) H_rec + lam (s_rec/s_F) F_token. The per-position
Fisher weights come from the gradient pass, whose samples may arrive in another
order in the host's pass: :class:`SampleMatcher` pairs them up by content.
"""

from __future__ import annotations

import torch

from moonshot_plugins.core import layer_inputs, token_objective_weights
from moonshot_plugins.llmcompressor.gradient_pass import LayerTaylorStatistics

__all__ = ["SampleMatcher", "TokenReweighting"]


class SampleMatcher:
    """Which gradient-pass sample each of the host's calibration samples is.

    oneshot's dataloader may reshuffle on every pass, so samples are matched
    by content: the first layer to see a host sample (still dense there)
    compares the per-position sums of its input with that layer's fingerprints
    from the gradient pass, and the match holds for every later layer.
    """

    # Largest relative L2 distance between two fingerprints of one sample:
    # the same input seen twice differs by rounding only (the gradient pass's
    # bf16 autocast at most), different text differs by O(1); 0.05 lies
    # between the two.
    MATCH_TOLERANCE = 0.05

    def __init__(self, every_sample_seen: bool) -> None:
        """:param every_sample_seen: the gradient pass used every calibration
        sample, so a host sample without a match is an error"""
        self.every_sample_seen = every_sample_seen
        self._sample_of: dict[int, int | None] = {}  # host index -> gradient-pass index

    def gradient_sample(
        self, index: int, x: torch.Tensor, fingerprints: list[torch.Tensor]
    ) -> int | None:
        """The gradient-pass sample that is the host's sample ``index``, or None
        when the gradient pass did not see it (``fisher_samples``).

        :param x: the sample's layer input, (T, d_in)
        :param fingerprints: the layer's per-position input sums from the
            gradient pass, one (T_i,) tensor per sample
        """
        if index in self._sample_of:
            return self._sample_of[index]
        found = x.float().sum(dim=-1).cpu()
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
        if best_distance > self.MATCH_TOLERANCE:
            best = None
            if self.every_sample_seen:
                raise RuntimeError(
                    f"calibration sample {index} was not seen by the MOONSHOT gradient "
                    "pass: the calibration dataloader must yield the same samples on "
                    "every pass (in any order)"
                )
        self._sample_of[index] = best
        return best


class TokenReweighting:
    """sqrt(c_t)-reweighting of the host's layer inputs (see module docstring).

    :param fisher_fraction: share of the calibration samples the gradient pass
        used, in (0, 1]; the others keep c_t = 1 - lam (reconstruction only)
    """

    def __init__(self, fisher_fraction: float) -> None:
        self.fisher_fraction = fisher_fraction
        self.matcher = SampleMatcher(every_sample_seen=fisher_fraction == 1.0)

    def reweighted_input(
        self,
        module: torch.nn.Module,
        inp: torch.Tensor,
        statistics: LayerTaylorStatistics,
        seen: int,
    ) -> torch.Tensor:
        """sqrt(c_t) * x_t for this batch, in ``inp``'s shape and dtype.

        :param inp: the batch's input to ``module``, as the host's hook gets it
        :param statistics: the layer's record (token weights, energies, lam)
        :param seen: samples the host has already accumulated for this layer
            (the host index of the batch's first sample)
        """
        lam = statistics.taylor_weight
        x = layer_inputs(module, inp)
        scale = torch.full(x.shape[:2], 1.0 - lam, dtype=torch.float32)
        for k in range(x.shape[0]):
            index = self.matcher.gradient_sample(seen + k, x[k], statistics.fingerprints)
            if index is None:
                continue  # not in the gradient pass (fisher_samples): recon term only
            scale[k] = token_objective_weights(
                statistics.token_weights[index],
                *statistics.token_energies,
                lam,
                self.fisher_fraction,
            )
        root = scale.sqrt().to(device=x.device, dtype=x.dtype).unsqueeze(-1)
        return (x * root).reshape(inp.shape)
