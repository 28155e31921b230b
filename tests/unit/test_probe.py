"""Linear probe: learns a linearly separable labelling, agrees with scikit-learn, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from unseg.errors import UnsegError
from unseg.methods.linear_probe import LinearProbe, LinearProbeConfig


def labelled(n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(3, 8, generator=g) * 2
    feats, labels = [], []
    for _ in range(n):
        cls = torch.randint(0, 3, (6, 6), generator=g)
        f = centers[cls].permute(2, 0, 1) + 0.5 * torch.randn(8, 6, 6, generator=g)
        lab = cls.repeat_interleave(2, 0).repeat_interleave(2, 1).clone()
        lab[0, 0] = 255
        feats.append(f.contiguous())
        labels.append(lab)
    return feats, labels


def test_probe_fits_separable_labels_like_logistic_regression() -> None:
    feats, labels = labelled()
    probe = LinearProbe(LinearProbeConfig(num_classes=3, epochs=60, label_factor=1)).fit(
        feats, [lab[::2, ::2] for lab in labels]
    )
    x = torch.cat([f.reshape(8, -1).T for f in feats]).numpy()
    y = torch.cat([lab[::2, ::2].reshape(-1) for lab in labels]).numpy()
    keep = y != 255
    ref = LogisticRegression(max_iter=2000).fit(x[keep], y[keep]).score(x[keep], y[keep])
    ours = np.concatenate(
        [probe.predict(f, (6, 6)).reshape(-1).numpy() for f in feats]
    )
    acc = (ours[keep] == y[keep]).mean()
    assert ref > 0.97
    assert acc >= ref - 0.02
    assert probe.predict(feats[0], (12, 12)).shape == (12, 12)


def test_probe_bad_input() -> None:
    feats, _ = labelled(n=1)
    with pytest.raises(UnsegError, match="1 feature maps but 0"):
        LinearProbe().fit(feats, [])
    with pytest.raises(UnsegError, match="before fit"):
        LinearProbe().predict(feats[0], (6, 6))
