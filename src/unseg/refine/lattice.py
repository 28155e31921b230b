"""Permutohedral lattice (Adams, Baek & Davis 2010) for high-dimensional Gaussian filtering, in
torch, with the discretisation of Krähenbühl & Koltun's ``densecrf`` (the library behind
``pydensecrf``).

A point set ``features [N, d]`` is embedded in the ``d``-dimensional hyperplane of ``Z^{d+1}``
(scaled so that the lattice's blur is a Gaussian of standard deviation 1 in feature units);
each point lies in one simplex whose ``d + 1`` vertices are lattice points with integer keys.
Filtering a signal ``[N, K]``: *splat* each point's value onto its simplex's vertices with
barycentric weights, *blur* along each of the ``d + 1`` lattice directions with the kernel
``[1/2, 1, 1/2]`` (one Jacobi pass per direction, a missing neighbour counting zero), then
*slice* back with the same weights, times ``1 / (1 + 2^-d)``. That filter is what ``densecrf``
calls a kernel: it includes each point's own value.

Several point sets (images) share one :class:`Lattice`: their vertices are kept apart by a
batch index in the key, so one splat/blur/slice serves the whole batch. Everything runs on the
device of ``features``; the vertex lookup is a sort (``unique``) plus ``searchsorted``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from unseg.errors import UnsegError

_MAX_KEY_BITS = 62


@dataclass(frozen=True)
class Lattice:
    """A built lattice over ``N`` points (all images of a batch) with ``M`` vertices.

    Each step is a weighted gather-sum (``embedding_bag``: a sparse matrix product, one bag
    per output row, flat int32 ``*_index`` with ``*_offsets`` and ``*_weight``). *Splat*: each
    vertex sums its points with their barycentric weights. Each of the ``d + 1`` *blurs*: each
    vertex sums itself and its two neighbours along one lattice direction with weights
    ``1, 1/2, 1/2`` (a missing neighbour is the vertex itself with weight 0). *Slice*: each
    point sums its ``d + 1`` vertices with its barycentric weights times ``1 / (1 + 2^-d)``.
    """

    splat_index: torch.Tensor
    splat_offsets: torch.Tensor
    splat_weight: torch.Tensor
    blur_index: torch.Tensor  # [d+1, M*3]
    blur_offsets: torch.Tensor
    blur_weight: torch.Tensor  # [d+1, M*3]
    slice_index: torch.Tensor
    slice_offsets: torch.Tensor
    slice_weight: torch.Tensor

    @property
    def num_points(self) -> int:
        """``N``, the number of points."""
        return int(self.slice_offsets.numel())

    @property
    def num_vertices(self) -> int:
        """``M``, the number of lattice vertices."""
        return int(self.splat_offsets.numel())

    def scaled(self, before: torch.Tensor, after: torch.Tensor) -> Lattice:
        """The filter ``after * filter(before * values)`` for per-point scales ``[N]``, the
        scales folded into the splat and slice weights."""
        per_point = self.slice_index.numel() // max(1, self.num_points)
        return replace(
            self,
            splat_weight=self.splat_weight * before[self.splat_index.long()],
            slice_weight=self.slice_weight * after.repeat_interleave(per_point),
        )

    def filter(self, values: torch.Tensor) -> torch.Tensor:
        """Gaussian-filtered ``values [N, K]`` (float32) -> ``[N, K]``."""
        out = F.embedding_bag(self.splat_index, values, self.splat_offsets, mode="sum",
                              per_sample_weights=self.splat_weight)
        for index, weight in zip(self.blur_index, self.blur_weight, strict=True):
            out = F.embedding_bag(index, out, self.blur_offsets, mode="sum",
                                  per_sample_weights=weight)
        return F.embedding_bag(self.slice_index, out, self.slice_offsets, mode="sum",
                               per_sample_weights=self.slice_weight)


def _embed(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Elevate ``features [N, d]`` onto the hyperplane and find each point's simplex.

    Returns ``rem0 [N, d+1]`` (the nearest remainder-0 point), ``rank [N, d+1]`` (int64) and
    the barycentric weights ``[N, d+1]`` of the simplex's vertices ``0..d``.
    """
    n, d = features.shape
    inv_std = math.sqrt(2.0 / 3.0) * (d + 1)
    scale = torch.tensor(
        [inv_std / math.sqrt((i + 2) * (i + 1)) for i in range(d)],
        dtype=torch.float32, device=features.device,
    )
    cf = features * scale
    elevated = features.new_empty(n, d + 1)
    running = features.new_zeros(n)
    for j in range(d, 0, -1):  # the reference's order of float operations
        elevated[:, j] = running - j * cf[:, j - 1]
        running = running + cf[:, j - 1]
    elevated[:, 0] = running

    inv_d1 = torch.tensor(1.0 / (d + 1), dtype=torch.float32, device=features.device)
    nearest = torch.round(elevated * inv_d1)  # half to even, as SSE's conversion
    rem0 = nearest * (d + 1)
    total = nearest.sum(dim=1, keepdim=True)

    # rank[i] = #{j: diff_j > diff_i} + #{j < i: diff_j == diff_i}, the reference's ranks: the
    # position in a stable descending sort
    by_diff = (elevated - rem0).argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(by_diff).scatter_(
        1, by_diff, torch.arange(d + 1, device=features.device).expand(n, d + 1).contiguous()
    )
    rank = rank.to(torch.float32) + total
    low = rank < 0
    high = rank >= d + 1
    shift = (d + 1) * (low.float() - high.float())
    rank = (rank + shift).long()
    rem0 = rem0 + shift

    delta = (elevated - rem0) * inv_d1
    by_rank = torch.empty_like(delta).scatter_(1, rank, delta)  # by_rank[r] = delta of rank r
    bary = torch.empty_like(delta)
    # vertex p (1..d) gets +delta[rank d-p] and -delta[rank d-p+1]; vertex 0 the wrap-around
    bary[:, 1:] = by_rank.flip(1)[:, 1:] - by_rank.flip(1)[:, :-1]
    bary[:, 0] = by_rank[:, d] + (1.0 - by_rank[:, 0])
    return rem0, rank, bary


def build_lattice(features: torch.Tensor, batch: torch.Tensor | None = None) -> Lattice:
    """The lattice of ``features [N, d]`` (float32, already divided by the kernel's widths).

    ``batch [N]`` (int64, optional) says which image each point belongs to; points of
    different images never share a vertex.
    """
    if features.ndim != 2 or features.shape[1] < 1 or features.shape[0] < 1:
        raise UnsegError(f"lattice features must be [N, d], got {tuple(features.shape)}")
    features = features.float()
    n, d = features.shape
    d1 = d + 1
    device = features.device
    rem0, rank, bary = _embed(features)

    # A vertex's key is its first d coordinates (the last follows from their sum), each within
    # d of rem0's; keys (and the blur's neighbours, which move each coordinate by at most d+1)
    # are encoded as one int64, with the image index as the most significant digit.
    base = rem0[:, :d].long()
    low = base.amin(0) - 2 * d1
    span = base.amax(0) + 2 * d1 - low + 1
    num_images = int(batch.max().item()) + 1 if batch is not None else 1
    bits = sum(math.log2(int(v)) for v in span.tolist()) + math.log2(num_images)
    if bits > _MAX_KEY_BITS:
        raise UnsegError(f"lattice too large to index: feature spans {span.tolist()}")
    strides = torch.ones(d, dtype=torch.long, device=device)
    for i in range(d - 2, -1, -1):
        strides[i] = strides[i + 1] * span[i + 1]
    image_stride = strides[0] * span[0]
    code0 = ((base - low) * strides).sum(1)
    if batch is not None:
        code0 = code0 + batch.long() * image_stride
    # vertex r adds canonical[r][rank_i] = r - (d+1) [rank_i > d - r] to coordinate i
    r = torch.arange(d1, device=device)
    above = rank[:, None, :d] > (d - r)[None, :, None]  # [N, d+1, d]
    offsets = r[None, :] * strides.sum() - d1 * (above.long() * strides).sum(2)
    codes = (code0[:, None] + offsets).reshape(-1)  # [N * (d+1)]

    uniq, inverse = torch.unique(codes, return_inverse=True)
    m = uniq.numel()
    # number the vertices in order of first use (raster order), as the reference's hash table
    # does, so that neighbouring pixels touch neighbouring rows
    first = torch.full((m,), n * d1, dtype=torch.long, device=device)
    first.scatter_reduce_(0, inverse, torch.arange(n * d1, device=device), "amin")
    order = first.argsort()  # row -> sorted-code index
    renumber = torch.empty_like(order)
    renumber[order] = torch.arange(m, device=device)
    vertex = renumber[inverse]  # [N * (d+1)]

    blur_index = torch.empty(d1, m, 3, dtype=torch.int32, device=device)
    blur_weight = torch.empty(d1, m, 3, dtype=torch.float32, device=device)
    itself = torch.arange(m, device=device)
    for j in range(d1):
        # the neighbours along direction j: key - 1 (+ (d+1) at j), and the opposite
        step = torch.full((d,), -1, dtype=torch.long, device=device)
        if j < d:
            step[j] = d
        shift = (step * strides).sum()
        blur_index[j, :, 0] = itself
        blur_weight[j, :, 0] = 1.0
        # in sorted-code order: one search finds each vertex's neighbour at +shift (sorted
        # queries: a cache-friendly search); the neighbour at -shift is its inverse
        wanted = uniq + shift
        pos = torch.searchsorted(uniq, wanted).clamp_max(m - 1)
        up = uniq[pos] == wanted
        down = torch.zeros_like(up)
        down[pos[up]] = True
        minus = itself.clone()
        minus[pos[up]] = itself[up]
        for side, found, neighbour in ((1, up, torch.where(up, pos, itself)), (2, down, minus)):
            blur_index[j, :, side] = renumber[neighbour][order]
            blur_weight[j, :, side] = found[order].float() * 0.5

    by_vertex = vertex.argsort(stable=True)
    counts = torch.bincount(vertex, minlength=m)
    offsets = torch.zeros(m, dtype=torch.int32, device=device)
    offsets[1:] = counts.cumsum(0)[:-1]
    alpha = 1.0 / (1.0 + 2.0 ** (-d))
    return Lattice(
        splat_index=(by_vertex // d1).int(),
        splat_offsets=offsets,
        splat_weight=bary.reshape(-1)[by_vertex].contiguous(),
        blur_index=blur_index.reshape(d1, m * 3),
        blur_offsets=torch.arange(0, 3 * m, 3, dtype=torch.int32, device=device),
        blur_weight=blur_weight.reshape(d1, m * 3),
        slice_index=vertex.int(),
        slice_offsets=torch.arange(0, n * d1, d1, dtype=torch.int32, device=device),
        slice_weight=(bary * alpha).reshape(-1),
    )
