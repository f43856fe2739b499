"""The legacy compressed-tensors ``sparse-24-bitmask`` layout of one 2:4 weight.

A 2-D weight (rows, cols) that is 2:4 along its last dimension is stored as
three tensors: ``compressed`` (the two kept values of every group of four,
(rows, cols/2)), ``bitmask`` (their positions, uint8 (rows, ceil(cols/8)))
and ``shape`` (int64 (2, 1)).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

LEGACY_FORMAT = "sparse-24-bitmask"
# the last compressed-tensors release that reads LEGACY_FORMAT
LEGACY_CT_VERSION = "0.14.0"
# what a layer's ``weight`` becomes in LEGACY_FORMAT
LEGACY_PARAMS = ("compressed", "bitmask", "shape")


def pack_bitmask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a 2-D bool mask into uint8 rows, 8 columns per byte, first column in the lowest bit."""
    if mask.dim() != 2:
        raise ValueError(f"bitmask packing needs a 2-D mask, got shape {tuple(mask.shape)}")
    rows, cols = mask.shape
    padded_cols = -(-cols // 8) * 8
    bits = torch.zeros(rows, padded_cols, dtype=torch.uint8)
    bits[:, :cols] = mask.to(torch.uint8)
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)
    return (bits.reshape(rows, padded_cols // 8, 8) * weights).sum(-1, dtype=torch.uint8)


def unpack_bitmask(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`pack_bitmask` for a dense ``shape`` (rows, cols)."""
    rows, cols = (int(s) for s in shape)
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)
    bits = (packed.to(torch.uint8).unsqueeze(-1) & weights) != 0
    return bits.reshape(rows, -1)[:, :cols]


def _bits_nonzero(weight: torch.Tensor) -> torch.Tensor:
    """True where the stored bit pattern is not all zeros (so -0.0 counts as a value to keep)."""
    int_type = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[weight.element_size()]
    return weight.contiguous().view(int_type) != 0


def sparse24_compress(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Compress a 2-D weight that is 2:4 along its last dimension.

    Returns ``{"compressed": values (rows, cols/2), "bitmask": uint8
    (rows, ceil(cols/8)), "shape": int64 (2, 1)}`` -- the tensors the legacy
    ``sparse-24-bitmask`` format stores per layer. Every group of four keeps
    exactly two entries: its non-zeros first, then its leading zeros, in
    column order, so decompression restores the weight bit for bit.
    """
    if weight.dim() != 2:
        raise ValueError(f"sparse-24-bitmask needs a 2-D weight, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    if cols % 4:
        raise ValueError(f"sparse-24-bitmask needs the input dimension to be a multiple of 4, got {cols}")
    weight = weight.contiguous()
    groups = _bits_nonzero(weight).reshape(rows, cols // 4, 4)
    if bool((groups.sum(-1) > 2).any()):
        raise ValueError("weight is not 2:4 (a group of four has more than two non-zeros)")
    # stable sort puts non-zeros (key 0) before zeros (key 1), each in column order
    order = torch.argsort((~groups).to(torch.int8), dim=-1, stable=True)[..., :2]
    keep = torch.zeros(rows, cols // 4, 4, dtype=torch.bool)
    keep.scatter_(-1, order, True)
    keep = keep.reshape(rows, cols)
    values = weight[keep].reshape(rows, cols // 2)  # row-major: column order within each row
    return {
        "compressed": values,
        "bitmask": pack_bitmask(keep),
        "shape": torch.tensor([rows, cols], dtype=torch.int64).reshape(-1, 1),
    }


def sparse24_decompress(compressed: torch.Tensor, bitmask: torch.Tensor, shape: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """Dense weight from the three tensors of :func:`sparse24_compress`."""
    dims = [int(s) for s in (shape.flatten().tolist() if isinstance(shape, torch.Tensor) else shape)]
    mask = unpack_bitmask(bitmask, dims)
    dense = torch.zeros(dims, dtype=compressed.dtype)
    dense[mask] = compressed.flatten()
    return dense
