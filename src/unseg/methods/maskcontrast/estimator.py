"""MaskContrast's estimator: training (seeded per epoch and image, sharded across torchrun
processes), the resume checkpoint written after every epoch (see "Resume" in the package
docstring), the saved state, and prediction (embeddings, image prototypes, the evaluation
protocol)."""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from unseg.backbones import LastStage, build_backbone
from unseg.errors import UnsegError
from unseg.methods.base import FitInputs, FromState
from unseg.methods.maskcontrast.config import MaskContrastConfig
from unseg.methods.maskcontrast.model import (
    MaskContrastHead,
    PrototypeQueue,
    balanced_bce,
    contrastive_loss,
    momentum_update,
)
from unseg.methods.maskcontrast.protocol import kmeans_protocol, weighted_prototype
from unseg.methods.maskcontrast.views import ViewPair, draw_views, view_cells
from unseg.registry import register
from unseg.utils import dist
from unseg.utils.device import cpu_threads
from unseg.utils.io import atomic_write

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.safetensors"


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix-style)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


@register(
    "maskcontrast",
    config=MaskContrastConfig,
    output="embedding",
    needs=("features", "student_features", "masks"),
    summary="MaskContrast: pixel embeddings contrasting salient-object mask proposals",
    aliases=("mask-contrast",),
    pipeline_fields=("seed", "stage_of"),
    rank=50,
)
class MaskContrast(FromState):
    """MaskContrast on frozen dense features (module docstring); estimator contract of
    :mod:`unseg.methods.base`. ``model_`` is the trained (query) head."""

    def __init__(
        self,
        config: MaskContrastConfig | None = None,
        device: str | torch.device | None = None,
        stage: LastStage | None = None,
    ) -> None:
        """``stage``: the backbone's pretrained last stage, needed to fit with
        ``train_last_stage`` (``backbone.last_stage()``)."""
        self.config = config or MaskContrastConfig()
        self.device = torch.device(device or "cpu")
        self.model_: MaskContrastHead | None = None
        self.history_: list[float] = []
        self.fallbacks_: int = 0
        self.in_channels_: int = 0
        self._stage = stage

    def _last_stage(self) -> LastStage | None:
        """The given stage, the config's stage rebuilt (weights to be loaded), or None."""
        if not self.config.train_last_stage:
            return None
        if self._stage is not None:
            return self._stage
        name, _, tap = self.config.stage_of.partition(":")
        if not name or not tap:
            raise UnsegError(
                "train_last_stage needs the backbone's last stage: pass stage= "
                "(backbone.last_stage()) or set stage_of to 'backbone:tap'"
            )
        return build_backbone(name, tap).last_stage()

    def _build(self, in_channels: int) -> MaskContrastHead:
        """The model for features of ``in_channels`` (the stage's input when there is one)."""
        self.in_channels_ = in_channels
        last = self._last_stage()
        stage = None if last is None else copy.deepcopy(last.module).requires_grad_(True)
        head_channels = in_channels if last is None else last.channels
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            return MaskContrastHead(head_channels, self.config, stage).to(self.device)

    # ----------------------------------------------------------------- training
    def fit(self, inputs: FitInputs, checkpoint_dir: str | Path | None = None) -> MaskContrast:
        """Train the head on ``inputs.features [C, h, w]`` and ``inputs.masks [H, W]`` (and
        ``inputs.student_features`` for the query views when given).

        With ``checkpoint_dir`` a checkpoint is written there after every epoch and an existing
        one (same config) is resumed. Under torchrun every rank passes the same inputs; each
        takes its share of every batch, gradients are averaged and the queue gathers all ranks.
        """
        cfg = self.config
        feats, masks = list(inputs.features), inputs.masks
        if masks is None:
            raise UnsegError("MaskContrast needs saliency mask proposals (FitInputs.masks)")
        if len(masks) != len(feats) or not feats:
            raise UnsegError(f"{len(feats)} feature maps but {len(masks)} saliency masks")
        students = inputs.student_features
        if cfg.train_last_stage and self._stage is None:
            raise UnsegError(
                "train_last_stage: fitting needs the backbone's pretrained last stage "
                "(MaskContrast(config, stage=backbone.last_stage()))"
            )
        if students is not None and len(students) != len(feats):
            raise UnsegError("student_features must match features one to one")
        if len({f.shape[0] for f in feats}) != 1:
            raise UnsegError("all feature maps must have the same number of channels")
        for i, (f, m) in enumerate(zip(feats, masks, strict=True)):
            _check_pair(i, f, m)
        cells = {view_cells(f, m, cfg) for f, m in zip(feats, masks, strict=True)}
        if len(cells) > 1:
            raise UnsegError(
                f"the images' views would have feature grids of {sorted(cells)} cells per side "
                "(masks at different strides of their feature maps); give every mask at the "
                "size of the image its features were computed on"
            )
        model = self._build(int(feats[0].shape[0]))
        key = copy.deepcopy(model)
        for p in key.parameters():
            p.requires_grad_(False)
        queue = PrototypeQueue(
            cfg.queue_size, cfg.embed_dim, torch.Generator().manual_seed(_mix(cfg.seed, 1))
        ).to(self.device)
        optim = torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=cfg.sgd_momentum, weight_decay=cfg.weight_decay
        )
        self.history_, self.fallbacks_ = [], 0
        start = 0
        path = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir is not None else None
        if path is not None and path.exists():
            start = self._resume(path, model, key, queue, optim)
        rank, world = dist.rank(), dist.world_size()
        for epoch in range(start, cfg.epochs):
            for group in optim.param_groups:
                group["lr"] = cfg.lr * (1.0 - epoch / cfg.epochs) ** cfg.poly_power
            order = torch.randperm(
                len(feats), generator=torch.Generator().manual_seed(_mix(cfg.seed, 2, epoch))
            ).tolist()
            for s in range(0, len(order), cfg.batch_size):
                mine = dist.shard(order[s : s + cfg.batch_size], rank, world)
                # many tiny ops: intra-op threads only spin-wait (badly on a loaded machine)
                with cpu_threads(self.device, 1):
                    views = [
                        draw_views(
                            feats[i].to(self.device),
                            masks[i].to(self.device),
                            cfg,
                            torch.Generator().manual_seed(_mix(cfg.seed, 3, epoch, i)),
                            None if students is None else students[i].to(self.device),
                        )
                        for i in mine
                    ]
                self.fallbacks_ += sum(v.fallback for v in views)
                self.history_.append(self._step(views, model, key, queue, optim))
            logger.info(
                "MaskContrast epoch %d/%d: loss %.4f",
                epoch + 1,
                cfg.epochs,
                self.history_[-1] if self.history_ else float("nan"),
            )
            if path is not None:
                if dist.is_main():
                    self._save_checkpoint(path, epoch + 1, model, key, queue, optim)
                dist.barrier()
        if self.fallbacks_:
            logger.info(
                "%d view pairs fell back to the whole image (salient area)", self.fallbacks_
            )
        model.eval()
        self.model_ = model
        return self

    def _step(
        self,
        views: list[ViewPair],
        model: MaskContrastHead,
        key: MaskContrastHead,
        queue: PrototypeQueue,
        optim: torch.optim.Optimizer,
    ) -> float:
        """One SGD step on this rank's ``views``; returns this rank's loss."""
        cfg = self.config
        model.train()
        key.train()
        optim.zero_grad(set_to_none=False)
        momentum_update(key, model, cfg.momentum)
        if views:
            side = views[0].query_mask.shape[-1]
            q_emb, q_sal = model(torch.stack([v.query for v in views]))
            q_emb = F.interpolate(q_emb, size=(side, side), mode="bilinear", align_corners=False)
            q_sal = F.interpolate(q_sal, size=(side, side), mode="bilinear", align_corners=False)
            q_mask = torch.stack([v.query_mask for v in views])
            with torch.no_grad():
                k_emb, _ = key(torch.stack([v.key for v in views]))
                k_emb = F.interpolate(
                    k_emb, size=(side, side), mode="bilinear", align_corners=False
                )
                k_mask = torch.stack([v.key_mask for v in views]).to(k_emb.dtype)
                protos = F.normalize(
                    torch.einsum("bdhw,bhw->bd", F.normalize(k_emb, dim=1), k_mask), dim=1
                )
            loss = contrastive_loss(q_emb, q_mask, protos, queue.items, cfg.temperature)
            loss = loss + cfg.saliency_weight * balanced_bce(q_sal[:, 0], q_mask)
            loss.backward()
        else:
            protos = queue.items.new_zeros((0, cfg.embed_dim))
            loss = torch.zeros(())
        queue.enqueue(protos)
        if dist.is_distributed():
            for p in model.parameters():
                if p.grad is None:  # no views on this rank at the first step
                    p.grad = torch.zeros_like(p)
                torch.distributed.all_reduce(p.grad)
                p.grad /= dist.world_size()
            for b in model.buffers():
                torch.distributed.broadcast(b, src=0)
        optim.step()
        return float(loss.detach())

    # ----------------------------------------------------------------- checkpoints
    def _save_checkpoint(
        self,
        path: Path,
        epoch: int,
        model: MaskContrastHead,
        key: MaskContrastHead,
        queue: PrototypeQueue,
        optim: torch.optim.Optimizer,
    ) -> None:
        """Write everything a resume needs to ``path`` (safetensors, atomically)."""
        tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
        tensors |= {f"key.{k}": v for k, v in key.state_dict().items()}
        for i, p in enumerate(model.parameters()):
            buf = optim.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                tensors[f"optim.{i}"] = buf
        tensors |= {
            "queue": queue.items,
            "queue_ptr": torch.tensor(queue.ptr),
            "epoch": torch.tensor(epoch),
            "fallbacks": torch.tensor(self.fallbacks_),
            "history": torch.tensor(self.history_, dtype=torch.float64),
        }
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        meta = {"config": json.dumps(asdict(self.config))}
        atomic_write(path, lambda p: save_file(tensors, str(p), metadata=meta))

    def _resume(
        self,
        path: Path,
        model: MaskContrastHead,
        key: MaskContrastHead,
        queue: PrototypeQueue,
        optim: torch.optim.Optimizer,
    ) -> int:
        """Load the checkpoint at ``path`` into the training state; returns the epochs done."""
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            state = load_file(str(path))
        except Exception as exc:  # safetensors raises several kinds on a damaged file
            raise UnsegError(f"{path}: unreadable checkpoint ({exc})") from None
        if json.loads(meta.get("config", "null")) != json.loads(json.dumps(asdict(self.config))):
            raise UnsegError(
                f"{path}: checkpoint of another configuration; use a new checkpoint folder or "
                "the same settings"
            )
        try:
            model.load_state_dict(_prefixed(state, "model."))
            key.load_state_dict(_prefixed(state, "key."))
        except RuntimeError as exc:
            raise UnsegError(f"{path}: checkpoint does not fit these features ({exc})") from None
        for i, p in enumerate(model.parameters()):
            if f"optim.{i}" in state:
                optim.state[p]["momentum_buffer"] = state[f"optim.{i}"].to(self.device)
        queue.items = state["queue"].to(self.device)
        queue.ptr = int(state["queue_ptr"])
        self.fallbacks_ = int(state["fallbacks"])
        self.history_ = state["history"].tolist()
        epoch = int(state["epoch"])
        logger.info("resuming MaskContrast from %s after epoch %d", path, epoch)
        return epoch

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trained head's tensors (CPU; the trained stage's under ``head.stage.``), plus
        ``in_channels`` (the features' channels)."""
        model = self._model()
        state = {f"head.{k}": v.detach().cpu() for k, v in model.state_dict().items()}
        state["in_channels"] = torch.tensor(self.in_channels_)
        return state

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """For :meth:`from_state`: the head of :meth:`state_dict`'s output, in eval mode."""
        if "in_channels" not in state:
            raise UnsegError("not a MaskContrast state: 'in_channels' is missing")
        model = self._build(int(state["in_channels"]))
        try:
            model.load_state_dict(_prefixed(state, "head."))
        except RuntimeError as exc:
            raise UnsegError(f"MaskContrast state does not fit its config ({exc})") from None
        model.eval()
        self.model_ = model

    # ----------------------------------------------------------------- inference
    def _model(self) -> MaskContrastHead:
        if self.model_ is None:
            raise UnsegError("MaskContrast used before fit")
        return self.model_

    @torch.no_grad()
    def forward(
        self, features: torch.Tensor, size: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(raw embedding ``[D, H, W]``, saliency logit ``[H, W]``) of one image's
        ``features [C, h, w]``, upsampled bilinearly to ``size`` (default: the feature grid)."""
        model = self._model()
        model.eval()
        emb, sal = model(features[None].float().to(self.device))
        if size is not None:
            emb = F.interpolate(emb, size=size, mode="bilinear", align_corners=False)
            sal = F.interpolate(sal, size=size, mode="bilinear", align_corners=False)
        return emb[0], sal[0, 0]

    def embed(self, features: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """L2-normalised pixel embeddings ``[D, H, W]`` of ``features [C, h, w]``."""
        return F.normalize(self.forward(features, size)[0], dim=0)

    def image_prototype(
        self, features: torch.Tensor, size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the image's vector ``[D]``, its salient pixels ``[H, W]`` bool) as the paper's
        evaluation: raw embeddings weighted by the saliency logit where it exceeds 0.5."""
        emb, sal = self.forward(features, size)
        salient = sal > 0.5
        return weighted_prototype(emb, sal * salient), salient

    def predict_set(
        self,
        features: Sequence[torch.Tensor],
        sizes: Sequence[tuple[int, int]],
        num_clusters: int = 20,
        seed: int = 0,
        pca_dim: int = 32,
    ) -> list[torch.Tensor]:
        """Per-image k-means protocol on a set: label maps ``[H, W]`` (int64, 0 = background,
        1..num_clusters) for ``features[i] [C, h, w]`` at ``sizes[i]``."""
        pairs = [self.image_prototype(f, s) for f, s in zip(features, sizes, strict=True)]
        protos = torch.stack([p for p, _ in pairs]).cpu()
        masks = [m.cpu() for _, m in pairs]
        return kmeans_protocol(protos, masks, num_clusters, pca_dim=pca_dim, seed=seed)


def _check_pair(index: int, features: torch.Tensor, mask: torch.Tensor) -> None:
    """Raise unless ``mask [H, W]`` covers the image of ``features [C, h, w]`` (same aspect)."""
    if features.ndim != 3 or mask.ndim != 2:
        raise UnsegError(
            f"image {index}: features must be [C, h, w] and its mask [H, W], got "
            f"{tuple(features.shape)} and {tuple(mask.shape)}"
        )
    sy, sx = mask.shape[0] / features.shape[1], mask.shape[1] / features.shape[2]
    if min(sy, sx) < 1 or abs(sy - sx) > 0.1 * max(sy, sx):
        raise UnsegError(
            f"image {index}: mask {mask.shape[0]}x{mask.shape[1]} is not at the size of the "
            f"image of its {features.shape[1]}x{features.shape[2]} feature map"
        )


def _prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
