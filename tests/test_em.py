"""PriMaPs-EM step semantics on hand-made cases, initialisation, fitting and determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from unseg.errors import UnsegError
from unseg.methods.primaps_em import (
    PriMaPsEM,
    PriMaPsEMConfig,
    cosine_logits,
    e_step,
    ema_update,
    focal_weights,
    pca_directions,
)


def test_e_step_takes_the_mode_inside_each_proposal_and_keeps_ignore() -> None:
    pred = torch.tensor([[0, 1, 1, 2], [2, 2, 0, 1]])
    props = torch.tensor([[5, 5, 5, 7], [7, 7, 255, 255]])
    out = e_step(pred, props, num_classes=3, ignore_index=255)
    # proposal 5 → preds (0, 1, 1) → mode 1; proposal 7 → (2, 2, 2) → 2; ignore stays
    assert out.tolist() == [[1, 1, 1, 2], [2, 2, 255, 255]]


def test_e_step_ties_go_to_the_smallest_class_and_all_ignore_is_fine() -> None:
    pred = torch.tensor([3, 1, 1, 3])
    props = torch.tensor([0, 0, 0, 0])
    assert e_step(pred, props, num_classes=4).tolist() == [1, 1, 1, 1]
    pred = torch.tensor([3, 1])
    assert e_step(pred, torch.tensor([0, 0]), num_classes=4).tolist() == [1, 1]
    assert e_step(pred, torch.tensor([255, 255]), num_classes=4).tolist() == [255, 255]


def test_focal_weights_by_hand() -> None:
    probs = torch.tensor([[0.5, 0.5, 0.0], [0.9, 0.0, 0.1]])
    w = focal_weights(probs, gamma=2.0)
    torch.testing.assert_close(w, torch.tensor([(1 - 0.7) ** 2, (1 - 0.25) ** 2, (1 - 0.05) ** 2]))


def test_ema_arithmetic() -> None:
    m = torch.tensor([[1.0, 0.0]])
    r = torch.tensor([[0.0, 1.0]])
    torch.testing.assert_close(ema_update(m, r, 0.98), torch.tensor([[0.98, 0.02]]))


def test_ema_happens_every_ten_steps_with_decay_098() -> None:
    feats, props = blobs()
    init = PriMaPsEM(PriMaPsEMConfig(num_classes=3)).initialise(
        feats, torch.Generator().manual_seed(0)
    )
    nine = PriMaPsEM(PriMaPsEMConfig(num_classes=3, steps=9, batch_size=4)).fit(feats, props)
    torch.testing.assert_close(nine.prototypes_, init)  # no EMA update before step 10
    assert not torch.allclose(nine.running_, init)
    ten = PriMaPsEM(PriMaPsEMConfig(num_classes=3, steps=10, batch_size=4)).fit(feats, props)
    torch.testing.assert_close(ten.prototypes_, 0.98 * init + 0.02 * ten.running_)


def blobs(
    n_images: int = 6, seed: int = 0, classes: list | None = None
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Images of 3 planted classes (thirds, random order); proposals = thirds; ``classes`` gets
    each image's class map ``[6, 12]``."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(3, 16, generator=g) * 2
    feats, props = [], []
    for _ in range(n_images):
        perm = torch.randperm(3, generator=g)
        cls = perm.repeat_interleave(4)[None].expand(6, 12)
        f = centers[cls].permute(2, 0, 1) + 0.3 * torch.randn(16, 6, 12, generator=g)
        feats.append(f.contiguous())
        if classes is not None:
            classes.append(cls.numpy())
        p = torch.arange(3).repeat_interleave(8)[None].expand(12, 24).clone()  # factor 2
        p[:, :2] = 255
        props.append(p)
    return feats, props


def test_fit_recovers_planted_classes_and_predicts_at_any_size() -> None:
    classes: list = []
    feats, props = blobs(classes=classes)
    model = PriMaPsEM(PriMaPsEMConfig(num_classes=3, steps=30, batch_size=4)).fit(feats, props)
    assert model.prototypes_.shape == (3, 16)
    g = torch.Generator().manual_seed(0)
    preds = []
    for f in feats:
        pred = model.predict(f, size=(24, 48), factor=2)
        assert pred.shape == (24, 48) and pred.dtype == torch.int64
        preds.append(pred.numpy().ravel())
        lab = cosine_logits(f, torch.randn(3, 16, generator=g)).shape
        assert lab == (3, 6, 12)
    truth = [np.kron(c, np.ones((4, 4), dtype=np.int64)).ravel() for c in classes]
    assert adjusted_rand_score(np.concatenate(truth), np.concatenate(preds)) > 0.95
    assert all(np.isfinite(model.history_))


def test_fixed_seed_gives_identical_runs() -> None:
    feats, props = blobs()
    cfg = PriMaPsEMConfig(num_classes=3, steps=12, batch_size=4, seed=7)
    a = PriMaPsEM(cfg).fit(feats, props)
    b = PriMaPsEM(cfg).fit(feats, props)
    assert torch.equal(a.prototypes_, b.prototypes_)
    assert torch.equal(a.running_, b.running_)
    assert a.history_ == b.history_


def test_student_features_train_theta_but_e_step_uses_clean_view() -> None:
    feats, props = blobs()
    student = [f + 0.05 for f in feats]
    cfg = PriMaPsEMConfig(num_classes=3, steps=5, batch_size=4)
    a = PriMaPsEM(cfg).fit(feats, props)
    b = PriMaPsEM(cfg).fit(feats, props, student_features=student)
    assert not torch.equal(a.running_, b.running_)


def test_pca_directions_match_numpy_svd() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(400, 10, generator=g) * torch.linspace(4, 0.5, 10)
    d = pca_directions(x, 3)
    xc = x.double().numpy() - x.double().numpy().mean(0)
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    np.testing.assert_allclose(np.abs((vt[:3] * d.double().numpy()).sum(1)), 1.0, atol=1e-5)


def test_bad_inputs() -> None:
    feats, props = blobs(n_images=1)
    with pytest.raises(UnsegError, match="at least 2"):
        PriMaPsEM(PriMaPsEMConfig(num_classes=1)).fit(feats, props)
    with pytest.raises(UnsegError, match="larger than the number of feature vectors"):
        PriMaPsEM(PriMaPsEMConfig(num_classes=100)).fit(feats, props)
    with pytest.raises(UnsegError, match="1 feature maps but 0"):
        PriMaPsEM().fit(feats, [])
    with pytest.raises(UnsegError, match="before fit"):
        PriMaPsEM().predict(feats[0], (6, 12))


def test_cosine_logits_equal_normalising_the_upsampled_features() -> None:
    g = torch.Generator().manual_seed(4)
    f = torch.randn(16, 5, 7, generator=g) + 1.0
    w = torch.randn(3, 16, generator=g)
    up = torch.nn.functional.interpolate(f[None], size=(15, 21), mode="bilinear",
                                         align_corners=False)
    naive = torch.einsum(
        "kc,chw->khw",
        torch.nn.functional.normalize(w, dim=1),
        torch.nn.functional.normalize(up, dim=1)[0],
    )
    torch.testing.assert_close(cosine_logits(f, w, factor=3), naive, atol=1e-5, rtol=1e-5)


def test_logit_scale_multiplies_the_m_step_logits() -> None:
    feats, props = blobs()
    base = PriMaPsEM(PriMaPsEMConfig(num_classes=3, steps=1, batch_size=6)).fit(feats, props)
    hot = PriMaPsEM(PriMaPsEMConfig(num_classes=3, steps=1, batch_size=6, logit_scale=10.0)).fit(
        feats, props
    )
    assert PriMaPsEMConfig().logit_scale == 1.0
    assert hot.history_[0] < base.history_[0]  # sharper logits on the same pseudo-labels
    assert not torch.equal(hot.running_, base.running_)
