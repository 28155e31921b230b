"""MaskContrast: losses against loops and the reference formula, queue, momentum, views,
evaluation protocol against scikit-learn, a planted-class run, resume and torchrun."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from unseg.backbones import build_backbone
from unseg.errors import UnsegError
from unseg.methods.base import FitInputs
from unseg.methods.maskcontrast import (
    MaskContrast,
    MaskContrastConfig,
    MaskContrastHead,
    PrototypeQueue,
    backbone_prototypes,
    balanced_bce,
    contrastive_loss,
    crop_features,
    crop_mask,
    draw_views,
    image_weights,
    kmeans,
    kmeans_protocol,
    momentum_update,
    pca_whiten,
    photometric_view,
    sample_crop_box,
)
from unseg.utils.device import cpu_threads

TESTS = Path(__file__).resolve().parent
TINY = MaskContrastConfig(
    width=16, aspp_rates=(1, 2), epochs=3, batch_size=4, view_size=32, loss_size=16,
    queue_size=8, lr=0.05, momentum=0.9, seed=3,
)  # fmt: skip


# ------------------------------------------------------------------------------ losses
def test_contrastive_loss_equals_a_pixel_loop():
    gen = torch.Generator().manual_seed(0)
    b, d, h, w, k, t = 3, 4, 3, 3, 5, 0.5
    query = torch.randn(b, d, h, w, generator=gen, dtype=torch.float64)
    mask = torch.rand(b, h, w, generator=gen) < 0.5
    mask[0, 0, 0] = mask[1, 1, 1] = mask[2, 2, 2] = True
    protos = F.normalize(torch.randn(b, d, generator=gen, dtype=torch.float64), dim=1)
    queue = F.normalize(torch.randn(k, d, generator=gen, dtype=torch.float64), dim=1)
    got = contrastive_loss(query, mask, protos, queue, t)

    count = [int(mask[i].sum()) for i in range(b)]
    total = sum(count)
    num, den = 0.0, 0.0
    for i in range(b):
        weight = 1.0 / math.log(1.02 + count[i] / total)
        for y in range(h):
            for x in range(w):
                if not mask[i, y, x]:
                    continue
                q = query[i, :, y, x] / query[i, :, y, x].norm()
                logits = [float(q @ p) / t for p in protos] + [float(q @ n) / t for n in queue]
                ce = math.log(sum(math.exp(v) for v in logits)) - logits[i]
                num += weight * ce
                den += weight
    assert float(got) == pytest.approx(num / den, rel=1e-10)
    empty = contrastive_loss(query, torch.zeros_like(mask), protos, queue, t)
    assert float(empty) == 0.0


def test_image_weights_are_enet_weights():
    w = image_weights(torch.tensor([0, 0, 0, 1]), 3)
    expected = [1 / math.log(1.02 + 0.75), 1 / math.log(1.02 + 0.25), 1 / math.log(1.02)]
    assert w.tolist() == pytest.approx(expected)
    assert w[1] > w[0]  # the smaller object weighs more


def test_balanced_bce_matches_the_reference_formula(rng: np.random.Generator):
    out = rng.normal(0, 3, (2, 5, 6))
    lab = (rng.random((2, 5, 6)) < 0.3).astype(np.float64)
    # the reference's (astmt) numerically stable expression, written out in NumPy
    ge = (out >= 0).astype(np.float64)
    val = out * (lab - ge) - np.log(1 + np.exp(out - 2 * out * ge))
    w = (1 - lab).sum() / lab.size
    ref = (w * (-lab * val).sum() + (1 - w) * (-(1 - lab) * val).sum()) / lab.size
    got = balanced_bce(torch.from_numpy(out), torch.from_numpy(lab).bool())
    assert float(got) == pytest.approx(ref, rel=1e-10)


# ------------------------------------------------------------------------------ queue, momentum
def test_queue_is_fifo():
    queue = PrototypeQueue(5, 2, torch.Generator().manual_seed(0))
    assert torch.allclose(queue.items.norm(dim=1), torch.ones(5))

    def rows(a: int, b: int) -> torch.Tensor:
        return torch.tensor([[float(i), 0.0] for i in range(a, b)])

    queue.enqueue(rows(1, 4))
    assert queue.items[:3, 0].tolist() == [1, 2, 3] and queue.ptr == 3
    queue.enqueue(rows(4, 8))  # 4, 5 fill the end, 6, 7 replace the oldest (1, 2)
    assert queue.items[:, 0].tolist() == [6, 7, 3, 4, 5] and queue.ptr == 2
    queue.enqueue(rows(8, 15))  # more than the queue: the newest 5
    assert queue.items[:, 0].tolist() == [10, 11, 12, 13, 14] and queue.ptr == 0


def test_momentum_update_arithmetic():
    torch.manual_seed(0)
    query, key = MaskContrastHead(4, TINY), MaskContrastHead(4, TINY)
    before = [p.clone() for p in key.parameters()]
    buffers = [b.clone() for b in key.buffers()]
    momentum_update(key, query, 0.9)
    for k0, k1, q in zip(before, key.parameters(), query.parameters(), strict=True):
        assert torch.allclose(k1, 0.9 * k0 + 0.1 * q, atol=1e-7)
    assert all(torch.equal(a, b) for a, b in zip(buffers, key.buffers(), strict=True))


# ------------------------------------------------------------------------------ views
def test_crop_features_is_roi_align_with_opencv_bilinear(rng: np.random.Generator):
    feats = torch.from_numpy(rng.normal(size=(3, 6, 8)).astype(np.float32))
    size, cells = (24, 32), 5  # stride 4
    for box, flip in [((2.0, 3.0, 17.0, 21.0), False), ((0.0, 5.0, 24.0, 20.0), True)]:
        got = crop_features(feats, box, flip, cells, size)
        top, left, ch, cw = box
        steps = (np.arange(2 * cells) + 0.5) / (2 * cells)
        ys = (top + steps * ch) / 4 - 0.5  # image pixels → feature-cell coordinates
        xs = (left + steps * cw) / 4 - 0.5
        if flip:
            xs = xs[::-1]
        mx, my = np.meshgrid(xs, ys)
        ref = np.stack([
            cv2.remap(f, mx.astype(np.float32), my.astype(np.float32), cv2.INTER_LINEAR,
                      borderMode=cv2.BORDER_REPLICATE)
            for f in feats.numpy()
        ])  # fmt: skip
        ref = ref.reshape(3, cells, 2, cells, 2).mean(axis=(2, 4))
        np.testing.assert_allclose(got.numpy(), ref, atol=1e-2)  # OpenCV: 1/32-pixel weights


def test_crop_mask_is_a_nearest_crop_and_flip():
    mask = torch.rand(20, 30, generator=torch.Generator().manual_seed(1)) > 0.5
    got = crop_mask(mask, (4.0, 6.0, 10.0, 10.0), False, 10)
    assert torch.equal(got, mask[4:14, 6:16])
    assert torch.equal(crop_mask(mask, (4.0, 6.0, 10.0, 10.0), True, 10), mask[4:14, 6:16].flip(1))
    blocks = mask[:10, :15].repeat_interleave(2, 0).repeat_interleave(2, 1)  # 2x2 blocks
    assert torch.equal(crop_mask(blocks, (4.0, 6.0, 10.0, 10.0), False, 5), mask[2:7, 3:8])


def test_crop_boxes_and_view_areas():
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        top, left, h, w = sample_crop_box((60, 80), gen, (0.2, 1.0))
        assert 0 <= top and top + h <= 60 and 0 <= left and left + w <= 80
        assert 0.2 * 4800 * 0.95 <= h * w <= 4800
    feats = torch.randn(4, 8, 8)
    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[8:20, 10:24] = True
    for _ in range(20):
        v = draw_views(feats, mask, TINY, gen)
        assert v.query.shape == v.key.shape == (4, 8, 8) and v.query_mask.shape == (16, 16)
        assert not v.fallback
        for m in (v.query_mask, v.key_mask):
            assert 0.01 < m.float().mean() < 0.99
    full = draw_views(feats, torch.ones(32, 32, dtype=torch.bool), TINY, gen)
    assert full.fallback and full.query_mask.all()  # no crop can be under 99 %: whole image
    student = draw_views(feats, mask, TINY, torch.Generator().manual_seed(5), feats + 1)
    plain = draw_views(feats, mask, TINY, torch.Generator().manual_seed(5))
    assert torch.allclose(student.query, plain.query + 1, atol=1e-5)  # query from the student
    assert torch.equal(student.key, plain.key)


def test_photometric_view():
    image = torch.rand(3, 10, 12, generator=torch.Generator().manual_seed(0))
    a = photometric_view(image, torch.Generator().manual_seed(1))
    b = photometric_view(image, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == image.shape
    grey = photometric_view(image, torch.Generator(), MaskContrastConfig(jitter_p=0, grey_p=1))
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    same = photometric_view(image, torch.Generator(), MaskContrastConfig(jitter_p=0, grey_p=0))
    assert torch.equal(same, image)


# ------------------------------------------------------------------------------ evaluation
def test_pca_whiten_matches_scikit_learn(rng: np.random.Generator):
    from sklearn.decomposition import PCA

    x = rng.normal(size=(40, 10)) @ rng.normal(size=(10, 10))
    got = pca_whiten(torch.from_numpy(x), 4).numpy()
    ref = PCA(n_components=4, whiten=True).fit_transform(x)
    signs = np.sign((got * ref).sum(axis=0))  # scikit-learn's sign convention varies by version
    np.testing.assert_allclose(got * signs, ref, atol=1e-8)
    np.testing.assert_allclose(got.std(axis=0, ddof=1), 1.0, atol=1e-8)
    with pytest.raises(UnsegError):
        pca_whiten(torch.from_numpy(x), 11)
    low = torch.from_numpy(x[:, :3] @ rng.normal(size=(3, 10)))  # rank 3
    white = pca_whiten(low, 5)
    assert torch.allclose(white[:, 3:], torch.zeros_like(white[:, 3:]))
    assert white[:, :3].std(0).min() > 0.99


def test_kmeans_matches_scikit_learn_on_blobs(rng: np.random.Generator):
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    centres = rng.normal(0, 6, (5, 3))
    x = np.concatenate([c + rng.normal(size=(30, 3)) for c in centres])
    ids = kmeans(torch.from_numpy(x), 5, seed=0).numpy()
    ref = KMeans(5, n_init=10, random_state=0).fit(x)
    assert adjusted_rand_score(ref.labels_, ids) == 1.0
    inertia = sum(((x[ids == c] - x[ids == c].mean(0)) ** 2).sum() for c in range(5))
    assert inertia == pytest.approx(ref.inertia_, rel=1e-9)
    with pytest.raises(UnsegError):
        kmeans(torch.from_numpy(x[:3]), 5)


def test_protocol_labels_salient_pixels_with_cluster_plus_one():
    protos = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [0.1, 0.99]])
    masks = [torch.zeros(3, 3, dtype=torch.bool) for _ in range(4)]
    for i, m in enumerate(masks):
        m[i % 3, :] = True
    maps = kmeans_protocol(protos, masks, num_clusters=2, pca_dim=1)
    values = [int(m.max()) for m in maps]
    assert values[0] == values[1] != values[2] == values[3] and set(values) == {1, 2}
    for m, lab in zip(masks, maps, strict=True):
        assert torch.equal(lab > 0, m) and lab.dtype == torch.int64
    # fewer images than pca_dim: N - 1 components, no zero-variance direction blown up
    small = torch.cat([protos, torch.tensor([[0.5, 0.5]])]).repeat(1, 4)  # 5 x 8, rank 2
    maps = kmeans_protocol(small, [*masks, masks[0]], num_clusters=2, pca_dim=32)
    assert len({int(m.max()) for m in maps}) == 2
    with pytest.raises(UnsegError, match="at least 2 images"):
        kmeans_protocol(protos[:1], masks[:1], num_clusters=1)


def test_backbone_prototypes_are_masked_means(rng: np.random.Generator):
    feats = [torch.from_numpy(rng.normal(size=(5, 4, 6)).astype(np.float32)) for _ in range(2)]
    masks = [torch.from_numpy(rng.random((8, 12)) < 0.4) for _ in range(2)]
    got = backbone_prototypes(feats, masks)
    for f, m, row in zip(feats, masks, got, strict=True):
        up = f.repeat_interleave(2, 1).repeat_interleave(2, 2)  # nearest upsampling
        ref = F.normalize(up[:, m].mean(dim=1), dim=0)
        assert torch.allclose(row, ref, atol=1e-6)


# ------------------------------------------------------------------------------ training
def planted(n: int = 36, g: int = 16, stride: int = 4, c: int = 8, seed: int = 0):
    """Objects of 3 texture classes (2x2 checkerboard of A/B, flat (A+B)/2, stripes of A/B)
    with the *same* mean feature on a background direction, plus noise: the mean of the input
    features over an object cannot tell the classes apart, local context can."""
    gen = torch.Generator().manual_seed(seed)
    a, b, bg = torch.eye(c)[0], torch.eye(c)[1], torch.eye(c)[2]
    yy, xx = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    patterns = [(yy // 2 + xx // 2) % 2 == 0, None, (yy // 2) % 2 == 0]
    feats, masks, classes = [], [], []
    for i in range(n):
        k = i % 3
        s = int(torch.randint(g * 7 // 16, g * 3 // 4, (), generator=gen))
        top, left = (int(v) for v in torch.randint(0, g - s + 1, (2,), generator=gen))
        m = torch.zeros(g, g, dtype=torch.bool)
        m[top : top + s, left : left + s] = True
        pat = patterns[k]
        obj = (
            ((a + b) / 2)[:, None, None]
            if pat is None
            else torch.where(pat[None], a[:, None, None], b[:, None, None])
        )
        f = torch.where(m[None], obj, bg[:, None, None]) + 0.2 * torch.randn(c, g, g, generator=gen)
        feats.append(f)
        masks.append(m.repeat_interleave(stride, 0).repeat_interleave(stride, 1))
        classes.append(k)
    return feats, masks, classes


def hungarian_miou(preds: list[torch.Tensor], gts: list[torch.Tensor], k: int) -> float:
    """mIoU over ``k`` classes after the one-to-one matching that maximises IoU."""
    p = torch.cat([x.flatten() for x in preds]).numpy()
    g = torch.cat([x.flatten() for x in gts]).numpy()
    iou = np.zeros((k, k))
    for i in range(k):
        for j in range(k):
            inter = np.sum((p == i) & (g == j))
            union = np.sum((p == i) | (g == j))
            iou[i, j] = inter / union if union else 0.0
    rows, cols = linear_sum_assignment(-iou)
    return float(iou[rows, cols].mean())


def test_planted_classes_are_separated_by_the_embeddings_not_the_inputs():
    feats, masks, classes = planted()
    gts = [m.long() * (c + 1) for m, c in zip(masks, classes, strict=True)]
    cfg = MaskContrastConfig(
        width=64, aspp_rates=(1, 2), epochs=40, batch_size=12, view_size=48, loss_size=24,
        queue_size=24, lr=0.2, momentum=0.99, seed=0,
    )  # fmt: skip
    with cpu_threads("cpu", 1):
        base = kmeans_protocol(backbone_prototypes(feats, masks), masks, 3, pca_dim=4)
        est = MaskContrast(cfg).fit(FitInputs(features=feats, masks=masks))
        protos = torch.stack([
            F.normalize(est.forward(f, tuple(m.shape))[0].flatten(1) @ m.flatten().float(), dim=0)
            for f, m in zip(feats, masks, strict=True)
        ])  # fmt: skip
        learned = kmeans_protocol(protos, masks, 3, pca_dim=4)
        own = est.predict_set(feats, [tuple(m.shape) for m in masks], 3, pca_dim=4)
    base_miou, learned_miou = hungarian_miou(base, gts, 4), hungarian_miou(learned, gts, 4)
    assert learned_miou > base_miou + 0.2, (base_miou, learned_miou)
    assert learned_miou > 0.7, (base_miou, learned_miou)
    # its own saliency (logit > 0.5) finds the objects
    agree = torch.stack([(o > 0) == m for o, m in zip(own, masks, strict=True)]).float().mean()
    assert agree > 0.9
    assert est.history_[-1] < est.history_[0]


def _fit(tmp: Path | None, feats, masks) -> MaskContrast:
    with cpu_threads("cpu", 1):
        return MaskContrast(TINY).fit(FitInputs(features=feats, masks=masks), checkpoint_dir=tmp)


def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path: Path, monkeypatch):
    feats, masks, _ = planted(n=10, g=8, c=4)
    whole = _fit(None, feats, masks)
    save = MaskContrast._save_checkpoint

    def killed(self, path, epoch, *args):
        save(self, path, epoch, *args)
        if epoch == 1:
            raise KeyboardInterrupt  # the process dies right after the first checkpoint

    monkeypatch.setattr(MaskContrast, "_save_checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path, feats, masks)
    monkeypatch.setattr(MaskContrast, "_save_checkpoint", save)
    resumed = _fit(tmp_path, feats, masks)
    one, two = whole.state_dict(), resumed.state_dict()
    assert one.keys() == two.keys()
    for k in one:
        assert torch.equal(one[k], two[k]), k
    assert resumed.history_ == whole.history_
    # a finished checkpoint: a re-run does no more epochs and gives the same head
    again = _fit(tmp_path, feats, masks)
    assert all(torch.equal(again.state_dict()[k], one[k]) for k in one)
    other = MaskContrast(MaskContrastConfig(**{**TINY.__dict__, "lr": 0.1}))
    with pytest.raises(UnsegError, match="another configuration"):
        other.fit(FitInputs(features=feats, masks=masks), checkpoint_dir=tmp_path)


def test_state_round_trip_and_bad_inputs(tmp_path: Path):
    feats, masks, _ = planted(n=6, g=8, c=4)
    est = _fit(None, feats, masks)
    back = MaskContrast.from_state(TINY, est.state_dict())
    for f, m in zip(feats, masks, strict=True):
        e1, s1 = est.forward(f, tuple(m.shape))
        e2, s2 = back.forward(f, tuple(m.shape))
        assert torch.equal(e1, e2) and torch.equal(s1, s2)
        assert torch.allclose(est.embed(f).norm(dim=0), torch.ones(8, 8), atol=1e-5)
    with pytest.raises(UnsegError, match=r"FitInputs\.masks"):
        MaskContrast(TINY).fit(FitInputs(features=feats))
    with pytest.raises(UnsegError, match="6 feature maps but 5"):
        MaskContrast(TINY).fit(FitInputs(features=feats, masks=masks[:5]))
    with pytest.raises(UnsegError, match="image 2: mask 32x16 is not at the size"):
        bad = [*masks[:2], masks[2][:, :16], *masks[3:]]
        MaskContrast(TINY).fit(FitInputs(features=feats, masks=bad))
    with pytest.raises(UnsegError, match="before fit"):
        MaskContrast(TINY).embed(feats[0])
    with pytest.raises(UnsegError, match="in_channels"):
        MaskContrast.from_state(TINY, {})
    (tmp_path / "checkpoint.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(UnsegError, match="unreadable checkpoint"):
        _fit(tmp_path, feats, masks)


def _stage_set(n: int = 6):
    """lite0's pretrained-shaped stage s32 (input b14, 192 ch) on random non-negative b14-like
    maps ``[192, 4, 4]`` with box masks at stride 8."""
    gen = torch.Generator().manual_seed(5)
    feats = [torch.randn(192, 4, 4, generator=gen).clamp(min=0) for _ in range(n)]
    masks = []
    for i in range(n):
        m = torch.zeros(32, 32, dtype=torch.bool)
        m[4 + i % 3 * 4 : 20 + i % 3 * 4, 6 : 22 + i % 2 * 6] = True
        masks.append(m)
    return feats, masks


def test_last_stage_is_trained_with_the_head_and_rebuilt_from_the_run(tmp_path, monkeypatch):
    backbone = build_backbone("efficientnet_lite0", "s32").eval()
    last = backbone.last_stage()
    assert last.input_tap == "b14"
    cfg = replace(TINY, train_last_stage=True, stage_of="efficientnet_lite0:s32")
    feats, masks = _stage_set()

    def fit(checkpoint: Path | None) -> MaskContrast:
        with cpu_threads("cpu", 1):
            est = MaskContrast(cfg, stage=last)
            return est.fit(FitInputs(features=feats, masks=masks), checkpoint_dir=checkpoint)

    with pytest.raises(UnsegError, match="needs the backbone's pretrained last stage"):
        MaskContrast(cfg).fit(FitInputs(features=feats, masks=masks))
    est = fit(None)
    model = est.model_
    assert model is not None and model.stage is not None
    before, after = last.module.state_dict(), model.stage.state_dict()
    moved = [k for k in before if "running" not in k and not torch.equal(before[k], after[k])]
    assert moved, "the stage's weights did not train"
    for k in (k for k in before if "running" in k):  # BN statistics stay the backbone's
        assert torch.equal(before[k], after[k]), k
    # the model is the stage followed by the decoder, on the features before the stage
    x = feats[0][None]
    with torch.no_grad():
        emb, sal = model(x)
        model.stage, stage = None, model.stage
        direct = model(stage(x))
        model.stage = stage
    assert torch.equal(emb, direct[0]) and torch.equal(sal, direct[1])
    # saved and rebuilt from the config alone (stage_of), the same embeddings
    state = est.state_dict()
    assert int(state["in_channels"]) == 192 and any(k.startswith("head.stage.") for k in state)
    back = MaskContrast.from_state(cfg, state)
    for f in feats:
        e1, s1 = est.forward(f, (32, 32))
        e2, s2 = back.forward(f, (32, 32))
        assert torch.equal(e1, e2) and torch.equal(s1, s2)
    with pytest.raises(UnsegError, match="stage_of"):
        MaskContrast.from_state(replace(cfg, stage_of=""), state)
    # killed after the first checkpoint and resumed: the same weights, stage included
    save = MaskContrast._save_checkpoint

    def killed(self, path, epoch, *args):
        save(self, path, epoch, *args)
        if epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(MaskContrast, "_save_checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        fit(tmp_path)
    monkeypatch.setattr(MaskContrast, "_save_checkpoint", save)
    resumed = fit(tmp_path).state_dict()
    assert resumed.keys() == state.keys()
    for k in state:
        assert torch.equal(resumed[k], state[k]), k


# ------------------------------------------------------------------------------ torchrun
RANK_SCRIPT = """
import json, sys
import torch
sys.path.insert(0, sys.argv[1])
from test_maskcontrast import TINY, planted
from unseg.methods.base import FitInputs
from unseg.methods.maskcontrast import MaskContrast, PrototypeQueue, gather_rows
from unseg.utils import dist
rank, world = dist.init_distributed()
queue = PrototypeQueue(6, 2, torch.Generator().manual_seed(0))
queue.enqueue(torch.tensor([[10.0 * rank + i, 1.0] for i in range(rank + 1)]))
rows = gather_rows(torch.full((rank + 2, 3), float(rank)))
feats, masks, _ = planted(n=7, g=8, c=4)  # batches of 4 and 3: shards of 2/2 and 2/1
est = MaskContrast(TINY).fit(FitInputs(features=feats, masks=masks))
result = {"rank": rank, "world": world, "queue": queue.items.tolist(), "ptr": queue.ptr,
          "rows": rows.tolist(), "state": {k: v.tolist() for k, v in est.state_dict().items()}}
with open(f"{sys.argv[2]}/result-{rank}.json", "w") as f:
    json.dump(result, f)
dist.cleanup()
"""


def test_queue_gathers_across_two_gloo_processes(tmp_path: Path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(script), str(TESTS), str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("result-*.json"))]
    assert [r["rank"] for r in results] == [0, 1] and {r["world"] for r in results} == {2}
    start = PrototypeQueue(6, 2, torch.Generator().manual_seed(0)).items
    expected = start.clone()
    expected[:3] = torch.tensor([[0.0, 1.0], [10.0, 1.0], [11.0, 1.0]])  # rank 0's row, rank 1's
    for r in results:
        assert torch.allclose(torch.tensor(r["queue"]), expected) and r["ptr"] == 3
        assert r["rows"] == [[0.0] * 3] * 2 + [[1.0] * 3] * 3
    # averaged gradients and rank 0's buffers: both ranks end with the same head
    assert results[0]["state"] == results[1]["state"]
