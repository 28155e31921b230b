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
    # vertex r adds canonical[r][rank_i] = r - (d+1) [rank_i > d - r] to coordinate i: the
    # coordinates of rank at least d - r + 1 lose d + 1, a suffix sum over ranks
    by_rank = torch.zeros(n, d1, dtype=torch.long, device=device)
    by_rank.scatter_(1, rank[:, :d], strides.expand(n, d).contiguous())  # stride at its rank
    suffix = by_rank.flip(1).cumsum(1)  # suffix[:, r] = sum of strides of rank >= d - r
    r = torch.arange(d1, device=device)
    lost = torch.zeros_like(suffix)
    lost[:, 1:] = suffix[:, :-1]  # ranks >= d - r + 1
    offsets = r[None, :] * strides.sum() - d1 * lost
    codes = (code0[:, None] + offsets).reshape(-1)  # [N * (d+1)]

    # one stable sort groups the (point, vertex) pairs by key, in raster order within a key
    sorted_codes, perm = torch.sort(codes, stable=True)
    new_key = torch.ones_like(sorted_codes, dtype=torch.bool)
    new_key[1:] = sorted_codes[1:] != sorted_codes[:-1]
    starts = torch.nonzero(new_key).flatten()
    uniq = sorted_codes.index_select(0, starts)
    m = uniq.numel()
    counts = torch.diff(starts, append=starts.new_tensor([n * d1]))
    # number the vertices in order of first use (raster order), as the reference's hash table
    # does, so that neighbouring pixels touch neighbouring rows; a key's first use is the first
    # of its run in the stable sort
    order = perm.index_select(0, starts).argsort()  # row -> sorted-code index
    renumber = torch.empty_like(order)
    renumber.index_copy_(0, order, torch.arange(m, device=device))
    vertex = torch.empty_like(perm)
    vertex.index_copy_(0, perm, renumber.index_select(0, torch.cumsum(new_key, 0) - 1))

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
        # queries: a cache-friendly search); the neighbour at -shift is its inverse, written
        # by a scatter (the vertices without a neighbour write to a spare slot)
        wanted = uniq + shift
        pos = torch.searchsorted(uniq, wanted).clamp_max(m - 1)
        up = uniq.index_select(0, pos) == wanted
        plus = torch.where(up, pos, itself)
        minus = torch.arange(m + 1, device=device)
        minus = minus.scatter_(0, torch.where(up, pos, m), itself)[:m]
        for side, neighbour in ((1, plus), (2, minus)):
            in_rows = neighbour.index_select(0, order)
            blur_index[j, :, side] = renumber.index_select(0, in_rows)
            blur_weight[j, :, side] = (in_rows != order).float() * 0.5

    # the splat's bags in vertex order: vertex v's pairs are its key's run of the sort
    run_counts = counts.index_select(0, order)
    bag_start = torch.zeros(m, dtype=torch.long, device=device)
    bag_start[1:] = run_counts.cumsum(0)[:-1]
    run_shift = torch.repeat_interleave(starts.index_select(0, order) - bag_start, run_counts,
                                        output_size=n * d1)  # no device sync
    by_vertex = perm.index_select(0, run_shift + torch.arange(n * d1, device=device))
    offsets = bag_start.int()
    alpha = 1.0 / (1.0 + 2.0 ** (-d))
    return Lattice(
        splat_index=(by_vertex // d1).int(),
        splat_offsets=offsets,
        splat_weight=bary.reshape(-1).index_select(0, by_vertex),
        blur_index=blur_index.reshape(d1, m * 3),
        blur_offsets=torch.arange(0, 3 * m, 3, dtype=torch.int32, device=device),
        blur_weight=blur_weight.reshape(d1, m * 3),
        slice_index=vertex.int(),
        slice_offsets=torch.arange(0, n * d1, d1, dtype=torch.int32, device=device),
        slice_weight=(bary * alpha).reshape(-1),
    )
