"""The MOONSHOT modifiers under ``torchrun --nproc-per-node K``.

LLM Compressor 0.14's oneshot runs one process per rank once a process group
is initialised (``torch.distributed.is_initialized()``). Each rank is meant to
calibrate on its own shard of the calibration set; 0.14's own split of one
``datasets.Dataset`` passed to every rank is broken (its sampler indexes the
unsplit set with the shard's row numbers, so every rank reads the first
shard), so each rank must be given its own shard, which oneshot then uses
as it is (docs/big-models.md, Under torchrun); :func:`check_ranks_agree` stops a run whose ranks
share their samples. Every rank runs the gradient pass and the host's
calibration on its own shard, so every statistic that is a sum or mean over
samples is reduced here:

- after the gradient pass (:func:`reduce_layer_statistics`): the Fisher
  ("matrix"/"diagonal", means weighted by each rank's sample count), the
  token energies A and B (sums), the row sensitivities (row energies summed,
  then normalised again) and the ``auto`` lam (from the summed moments of the
  per-position weights, :func:`~moonshot_plugins.core.auto_taylor_weight_from_moments`).
  The per-sample token weights stay on their rank: they reweight that rank's
  own samples in its own host pass, before the host statistics are reduced;
- at compression (:func:`reduce_to_owners`): each layer goes to one rank (as
  GPTQ spreads its layers), which receives the host's statistics of every
  rank (Hessians, Wanda's input norms, Gram matrices; means weighted by
  sample counts) and compresses it; :func:`broadcast_weights` then sends the
  pruned weights to every rank, so all ranks end with the same model.

Errors are raised on every rank (:func:`raised_on_every_rank`): a rank that
raised alone would leave the others waiting in the next collective. Every
function here is a no-op when no process group is initialised.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from compressed_tensors.distributed import greedy_bin_packing, is_distributed
from compressed_tensors.utils import align_module_device, update_offload_parameter

from moonshot_plugins.core import AUTO, auto_taylor_weight_from_moments, token_weight_moments
from moonshot_plugins.llmcompressor.gradient_pass import LayerTaylorStatistics

__all__ = [
    "broadcast_weights",
    "calibration_sample_digests",
    "check_ranks_agree",
    "global_sampled_fraction",
    "is_distributed",
    "raised_on_every_rank",
    "reduce_layer_statistics",
    "reduce_to_owners",
]


def _gathered(value: Any) -> list[Any]:
    """``value`` of every rank, by rank (a picklable object)."""
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def _comm_device(tensor: torch.Tensor) -> torch.device:
    """Where ``tensor`` travels: NCCL moves only accelerator tensors."""
    if dist.get_backend() == "nccl" and tensor.device.type == "cpu":
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device


@contextlib.contextmanager
def raised_on_every_rank(what: str) -> Iterator[None]:
    """Run the block (which must hold no collective), then raise on every rank
    if any rank raised: its own error on the failing rank, a RuntimeError
    naming that rank and its error on the others."""
    if not is_distributed():
        yield
        return
    error = None
    try:
        yield
    except Exception as exc:  # re-raised below, once every rank knows
        error = exc
    messages = _gathered(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(rank, message) for rank, message in enumerate(messages) if message is not None]
    if failed:
        rank, message = failed[0]
        raise RuntimeError(f"{what} failed on rank {rank} (stopped on every rank): {message}")


def calibration_sample_digests(dataloader: Any) -> list[str] | None:
    """One digest per calibration sample this rank's dataloader yields (of its
    ``input_ids`` row), in order; None without data or without ``input_ids``."""
    if dataloader is None:
        return None
    digests = []
    for batch in dataloader:
        ids = batch.get("input_ids") if isinstance(batch, dict) else None
        if not isinstance(ids, torch.Tensor):
            return None
        for row in ids.reshape(ids.shape[0], -1).cpu():
            digests.append(hashlib.sha1(row.numpy().tobytes()).hexdigest())
    return digests


def check_ranks_agree(modifier: str, fields: dict[str, Any], samples: list[str] | None) -> None:
    """Raise on every rank, before any weight changes, when the ranks run
    different recipes (naming the first field that differs and its value per
    rank), or hold calibration shards that are not one set split into
    near-equal disjoint parts: a rank with none, counts differing by more than
    one, or two ranks sharing at least half of the smaller one's samples.

    :param modifier: the modifier's name, for the message
    :param fields: the modifier's fields (``model_dump()``)
    :param samples: this rank's :func:`calibration_sample_digests` (None: unknown)
    """
    if not is_distributed():
        return
    seen = _gathered(({name: repr(value) for name, value in fields.items()}, samples))
    for name in fields:
        values = [rank_fields.get(name) for rank_fields, _ in seen]
        if len(set(values)) > 1:
            per_rank = ", ".join(f"rank {rank}: {value}" for rank, value in enumerate(values))
            raise ValueError(
                f"the ranks run different recipes: {modifier}.{name} is {per_rank}; every rank "
                "must run the same recipe. Nothing was changed"
            )
    shards = [rank_samples for _, rank_samples in seen]
    if any(shard is None for shard in shards):
        return
    _check_shards(shards)


def _check_shards(shards: list[list[str]]) -> None:
    """Raise unless the ranks' samples (digests) look like one calibration set split."""
    counts = [len(shard) for shard in shards]
    if min(counts) == 0 or max(counts) - min(counts) > 1:
        per_rank = ", ".join(f"rank {rank}: {count}" for rank, count in enumerate(counts))
        raise ValueError(
            f"the ranks hold different numbers of calibration samples ({per_rank}): under "
            "torchrun one calibration set is split into shards that differ by at most one "
            "sample, each rank needing at least one; give every rank its shard of the same "
            "set (at least one sample per rank). Nothing was changed"
        )
    for first in range(len(shards)):
        for second in range(first + 1, len(shards)):
            shared = len(set(shards[first]) & set(shards[second]))
            if 2 * shared >= min(counts[first], counts[second]):
                raise ValueError(
                    f"ranks {first} and {second} calibrate on {shared} of the same samples "
                    f"({counts[first]} and {counts[second]} each): every rank needs its own "
                    "shard of the calibration set. LLM Compressor 0.14 gives every rank the "
                    "first shard when all ranks pass the same dataset; pass each rank its own "
                    "(docs/big-models.md, Under torchrun). Nothing was changed"
                )


def global_sampled_fraction(fraction: float, used: int) -> float:
    """Share of all ranks' calibration samples the gradient passes used, from
    this rank's ``fraction`` (its ``used`` samples over its shard)."""
    if not is_distributed():
        return fraction
    totals = torch.tensor([used, used / fraction], dtype=torch.float64)
    dist.all_reduce(totals)
    return min(1.0, (totals[0] / totals[1]).item())


def reduce_layer_statistics(
    statistics: dict[torch.nn.Module, LayerTaylorStatistics],
    used: int,
    taylor_weight: float | str,
) -> None:
    """Turn every rank's gradient-pass records into those of all ranks'
    samples at once, in place (see the module docstring); the same layers,
    in the same order, on every rank.

    :param used: samples this rank's gradient pass used (the Fisher means' weight)
    :param taylor_weight: the modifier's; "auto" recomputes each layer's lam
    """
    if not is_distributed():
        return
    records = list(statistics.values())
    if any(record.row_factors is not None for record in records):
        # a rank's sketch covers its own samples only, and sketches of different
        # ranks do not add up to the sketch of all samples
        raise ValueError(
            "fisher_rows: per_row is not supported under torchrun (a process group is "
            "initialised); use fisher_rows: shared, or run in one process. Nothing was changed"
        )
    total = torch.tensor(float(used), dtype=torch.float64)
    dist.all_reduce(total)
    for record in records:
        if record.fisher is not None:
            device, dtype = record.fisher.device, record.fisher.dtype
            # summed in fp32 whatever the storage dtype (a bf16 diagonal)
            summed = (record.fisher.float() * used).to(_comm_device(record.fisher))
            dist.all_reduce(summed)
            record.fisher = (summed / total.item()).to(device=device, dtype=dtype)
    tokens = [record for record in records if record.token_weights is not None]
    if tokens:
        _reduce_token_statistics(tokens, taylor_weight)


def _reduce_token_statistics(records: list[LayerTaylorStatistics], taylor_weight: float | str) -> None:
    """Energies A, B and the weights' moments summed; row energies (the
    sensitivities times B, their mean) summed and normalised to mean 1 again."""
    scalars = torch.stack(
        [
            torch.cat([torch.tensor(r.token_energies, dtype=torch.float64),
                       token_weight_moments(torch.cat(r.token_weights))])
            for r in records
        ]
    )  # (layers, 5): A, B, count, sum w, sum w^2
    rows = torch.cat([r.row_sensitivities.double() * r.token_energies[1] for r in records])
    dist.all_reduce(scalars)
    dist.all_reduce(rows)
    offset = 0
    for record, (energy, weighted, *moments) in zip(records, scalars.tolist()):
        width = record.row_sensitivities.numel()
        row_energies = rows[offset : offset + width]
        offset += width
        record.row_sensitivities = (
            row_energies / row_energies.mean().clamp(min=torch.finfo(torch.float64).tiny)
        ).float()
        record.token_energies = (energy, weighted)
        if taylor_weight == AUTO:
            record.taylor_weight = auto_taylor_weight_from_moments(
                torch.tensor(moments, dtype=torch.float64), energy, weighted
            )


def reduce_to_owners(
    num_samples: dict[torch.nn.Module, int],
    host_statistics: Iterable[dict[torch.nn.Module, torch.Tensor]],
    rank_local: Iterable[dict[torch.nn.Module, Any]] = (),
) -> dict[torch.nn.Module, int]:
    """Assign each calibrated layer to one rank and reduce the host's
    statistics of all ranks onto it, in place.

    :param num_samples: the host's samples per layer (its keys: the layers to
        compress, in the same order on every rank); on the owner, the total after
    :param host_statistics: the host's per-layer means over samples (Hessians,
        input norms, Gram matrices), weighted by ``num_samples`` when reduced
    :param rank_local: other per-layer state; like the statistics, dropped on
        the ranks that do not own the layer
    :return: the owning rank of each layer (empty when not distributed)
    """
    if not is_distributed():
        return {}
    host_statistics, rank_local = list(host_statistics), list(rank_local)
    modules, _, owners = greedy_bin_packing(
        list(num_samples), dist.get_world_size(), item_weight_fn=lambda m: m.weight.numel()
    )
    rank = dist.get_rank()
    for module in modules:
        count = torch.tensor(float(num_samples[module]), dtype=torch.float64)
        dist.reduce(count, dst=owners[module])
        for store in host_statistics:
            statistic = store[module]
            summed = (statistic * num_samples[module]).to(_comm_device(statistic))
            dist.reduce(summed, dst=owners[module])
            if rank == owners[module]:
                store[module] = (summed / count.item()).to(statistic.device, statistic.dtype)
        if rank == owners[module]:
            num_samples[module] = int(count.item())
            continue
        for store in (num_samples, *host_statistics, *rank_local):
            store.pop(module, None)
    return owners


def broadcast_weights(owners: dict[torch.nn.Module, int]) -> None:
    """Send each layer's weight from the rank that compressed it to every rank."""
    rank = dist.get_rank() if owners else None
    for module, owner in owners.items():
        with torch.no_grad(), align_module_device(module):
            weight = module.weight.data
            travelling = weight.to(_comm_device(weight))
            dist.broadcast(travelling, src=owner)
            if rank != owner:
                update_offload_parameter(module, "weight", travelling.to(weight.device))
