"""PriMaPs-EM: step semantics by hand, the reference classifier (gain, EMA warm-up, focal loss),
the estimator contract, and recovery of planted classes against k-means."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.distributed
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score

from unseg.errors import UnsegError
from unseg.methods.base import FitInputs, SemanticEstimator
from unseg.methods.kmeans import KMeans, KMeansConfig, cosine_logits
from unseg.methods.primaps_em import (
    Adam,
    PriMaPsEM,
    PriMaPsEMConfig,
    e_step,
    ema_decay,
    ema_update,
    focal_loss_terms,
    focal_weights,
    learning_rate,
    pca_directions,
    probe_kmeans,
    proposal_count,
    proposal_modes,
    prototype_logits,
    top_eigenvectors,
)


def blobs(
    n_images: int = 6, seed: int = 0, classes: list | None = None
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Images of 3 planted classes (thirds, random order); proposals = thirds at twice the
    feature resolution; ``classes`` gets each image's class map ``[6, 12]``."""
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


def fit(feats, props, student=None, **kw) -> PriMaPsEM:
    cfg = PriMaPsEMConfig(**{"num_classes": 3, "batch_size": 4, **kw})
    return PriMaPsEM(cfg).fit(FitInputs(feats, proposals=props, student_features=student))


# ------------------------------------------------------------------------ step semantics


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


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_proposal_modes_match_a_brute_force_mode_per_proposal(seed: int) -> None:
    """The training loop's e-step (int16 ids, the count given): each proposal's most frequent
    prediction by counting with Python's ``Counter``, ties to the smallest class."""
    from collections import Counter

    g = torch.Generator().manual_seed(seed)
    pred = torch.randint(0, 5, (300,), generator=g)
    props = torch.randint(0, 9, (300,), generator=g).to(torch.int16)
    props[torch.rand(300, generator=g) < 0.3] = 255
    props[props == 4] = 7  # an id missing inside the range
    count = proposal_count(props)
    assert count == int(props[props != 255].max()) + 1
    out = proposal_modes(pred, props, count, num_classes=5)
    assert out.dtype == torch.int64
    for pid in set(props.tolist()) - {255}:
        inside = props == pid
        votes = Counter(pred[inside].tolist())
        best = max(votes.values())
        assert set(out[inside].tolist()) == {min(c for c, v in votes.items() if v == best)}
    assert (out[props == 255] == 255).all()
    assert torch.equal(out, e_step(pred, props.long(), num_classes=5))


def test_proposal_count_is_zero_when_all_is_ignored_and_rejects_negative_ids() -> None:
    assert proposal_count(torch.full((4,), 255)) == 0
    assert proposal_modes(torch.zeros(4, dtype=torch.long), torch.full((4,), 255), 0, 3).tolist() \
        == [255] * 4
    with pytest.raises(UnsegError, match="non-negative"):
        proposal_count(torch.tensor([0, -1, 255]))


def test_focal_weights_by_hand() -> None:
    probs = torch.tensor([[0.5, 0.5, 0.0], [0.9, 0.0, 0.1]])
    w = focal_weights(probs, gamma=2.0)
    torch.testing.assert_close(w, torch.tensor([(1 - 0.7) ** 2, (1 - 0.25) ** 2, (1 - 0.05) ** 2]))


def test_focal_loss_against_a_loop_over_classes_and_pixels() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(50, 4, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 4, (50,), generator=g)
    y[::7] = 255
    per_pixel, count = focal_loss_terms(logits, y, gamma=2.0)
    lg = logits.numpy()
    p = np.exp(lg - lg.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    weights = []
    for k in range(4):  # mean confidence of class k over ALL pixels, ignored ones included
        weights.append((1.0 - sum(p[i, k] for i in range(50)) / 50) ** 2)
    direct = []
    for i in range(50):
        yi = int(y[i])
        direct.append(0.0 if yi == 255 else -weights[yi] * np.log(p[i, yi]))
    assert float(count) == 50
    np.testing.assert_allclose(per_pixel.numpy(), direct, rtol=1e-10)
    np.testing.assert_allclose(float(per_pixel.sum() / count), np.mean(direct), rtol=1e-10)


def test_ema_arithmetic_and_warm_up_decay() -> None:
    m = torch.tensor([[1.0, 0.0]])
    r = torch.tensor([[0.0, 1.0]])
    torch.testing.assert_close(ema_update(m, r, 0.98), torch.tensor([[0.98, 0.02]]))
    assert [ema_decay(k) for k in (1, 2, 3, 4)] == pytest.approx([0.0, 0.5, 2 / 3, 0.75])
    assert ema_decay(50) == pytest.approx(0.98) and ema_decay(51) == 0.98
    assert ema_decay(500) == 0.98 and ema_decay(10, ceiling=0.5) == 0.5
    with pytest.raises(UnsegError, match="from 1"):
        ema_decay(0)


# ------------------------------------------------------------- the reference classifier


def test_reference_logits_equal_the_weight_normalised_conv_on_upsampled_raw_features() -> None:
    g = torch.Generator().manual_seed(4)
    f = torch.randn(16, 5, 7, generator=g) + 1.0
    v = torch.randn(3, 16, generator=g)
    gain = torch.tensor([0.5, 1.0, 2.0])
    up = F.interpolate(f[None], size=(15, 21), mode="bilinear", align_corners=False)[0]
    conv = torch.nn.utils.parametrizations.weight_norm(
        torch.nn.Conv2d(16, 3, 1, bias=False), dim=0
    )
    with torch.no_grad():
        conv.parametrizations.weight.original0.copy_(gain[:, None, None, None])
        conv.parametrizations.weight.original1.copy_(v[:, :, None, None])
        naive = conv(up[None])[0]
    got = prototype_logits(f, v, gain, "reference", factor=3)
    torch.testing.assert_close(got, naive, atol=1e-5, rtol=1e-5)
    cos = prototype_logits(f, v, gain, "cosine", factor=3)
    torch.testing.assert_close(cos, naive / up.norm(dim=0), atol=1e-5, rtol=1e-5)


def test_cosine_logits_equal_normalising_the_upsampled_features() -> None:
    g = torch.Generator().manual_seed(4)
    f = torch.randn(16, 5, 7, generator=g) + 1.0
    w = torch.randn(3, 16, generator=g)
    up = F.interpolate(f[None], size=(15, 21), mode="bilinear", align_corners=False)
    naive = torch.einsum("kc,chw->khw", F.normalize(w, dim=1), F.normalize(up, dim=1)[0])
    torch.testing.assert_close(cosine_logits(f, w, factor=3), naive, atol=1e-5, rtol=1e-5)
    one = prototype_logits(f, w, torch.ones(3), "cosine", factor=3)
    torch.testing.assert_close(one, naive, atol=1e-5, rtol=1e-5)


def test_the_gain_receives_its_analytic_gradient_and_is_trained() -> None:
    g = torch.Generator().manual_seed(5)
    f = torch.randn(8, 4, 4, generator=g)
    v = torch.randn(3, 8, generator=g)
    gain = torch.ones(3, requires_grad=True)
    prototype_logits(f, v, gain, "reference").sum().backward()
    # d/dg_k Σ_pixels g_k⟨v̂_k, f⟩ = Σ_pixels ⟨v̂_k, f⟩
    expect = (F.normalize(v, dim=1) @ f.reshape(8, -1)).sum(1)
    torch.testing.assert_close(gain.grad, expect)
    feats, props = blobs()
    ref = fit(feats, props, steps=5)
    assert not torch.allclose(ref.running_gain_, torch.ones(3))
    cos = fit(feats, props, steps=5, classifier="cosine")
    assert torch.equal(cos.running_gain_, torch.ones(3))  # unit gain: not trained
    assert not torch.equal(cos.running_, ref.running_)


def test_momentum_follows_the_warm_up_ema_of_direction_and_gain() -> None:
    feats, props = blobs()
    init = PriMaPsEM(PriMaPsEMConfig(num_classes=3)).initialise(
        feats, torch.Generator().manual_seed(0)
    )
    # steps are 0-based; updates after steps 10, 20, 30 with decays 0, 1/2, 2/3
    ten = fit(feats, props, steps=10)
    torch.testing.assert_close(ten.prototypes_, init)
    assert torch.equal(ten.gain_, torch.ones(3))
    assert not torch.allclose(ten.running_gain_, torch.ones(3))
    first = fit(feats, props, steps=11)  # θ after step 10 = first.running_
    torch.testing.assert_close(first.prototypes_, first.running_)
    torch.testing.assert_close(first.gain_, first.running_gain_)
    second = fit(feats, props, steps=21)
    v2 = 0.5 * first.running_ + 0.5 * second.running_
    g2 = 0.5 * first.running_gain_ + 0.5 * second.running_gain_
    torch.testing.assert_close(second.prototypes_, v2)
    torch.testing.assert_close(second.gain_, g2)
    third = fit(feats, props, steps=31)
    torch.testing.assert_close(third.prototypes_, 2 / 3 * v2 + 1 / 3 * third.running_)
    torch.testing.assert_close(third.gain_, 2 / 3 * g2 + 1 / 3 * third.running_gain_)
    assert not torch.allclose(third.prototypes_, third.running_)


def test_without_warm_up_the_momentum_moves_by_the_ceiling_from_the_first_update() -> None:
    feats, props = blobs()
    init = PriMaPsEM(PriMaPsEMConfig(num_classes=3)).initialise(
        feats, torch.Generator().manual_seed(0)
    )
    # unseg 0.1.0's schedule: θ_m ← 0.9·θ_m + 0.1·θ after steps 10 and 20 (0-based)
    first = fit(feats, props, steps=11, ema_warmup=False, ema_decay=0.9)
    v1 = 0.9 * init + 0.1 * first.running_
    torch.testing.assert_close(first.prototypes_, v1)
    torch.testing.assert_close(first.gain_, 0.9 + 0.1 * first.running_gain_)
    second = fit(feats, props, steps=21, ema_warmup=False, ema_decay=0.9)
    torch.testing.assert_close(second.prototypes_, 0.9 * v1 + 0.1 * second.running_)
    # the warm-up copies θ at the first update instead
    assert not torch.allclose(first.prototypes_, fit(feats, props, steps=11).prototypes_)


def test_first_loss_is_the_direct_per_pixel_focal_loss_of_the_initialisation() -> None:
    feats, props = blobs(n_images=2)
    student = [f * 1.5 + 0.2 for f in feats]
    model = fit(feats, props, student, steps=1, batch_size=2)
    init = model.initialise(feats, torch.Generator().manual_seed(0))
    unit = F.normalize(init, dim=1).numpy()
    order = torch.randperm(2, generator=torch.Generator().manual_seed(0)).tolist()
    logits, labels = [], []
    for i in order:  # pixel by pixel, on explicitly upsampled features
        clean = F.interpolate(feats[i][None], size=(12, 24), mode="bilinear")[0].numpy()
        stud = F.interpolate(student[i][None], size=(12, 24), mode="bilinear")[0].numpy()
        pred = np.einsum("kc,chw->khw", unit, clean).argmax(0)
        prop = props[i].numpy()
        lab = np.full(prop.shape, 255)
        for pid in np.unique(prop[prop != 255]):
            lab[prop == pid] = np.bincount(pred[prop == pid], minlength=3).argmax()
        logits.append(np.einsum("kc,chw->khw", unit, stud).reshape(3, -1).T)
        labels.append(lab.ravel())
    lg, y = np.concatenate(logits).astype(np.float64), np.concatenate(labels)
    p = np.exp(lg - lg.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    w = (1 - p.mean(0)) ** 2
    loss = [0.0 if t == 255 else -w[t] * np.log(p[j, t]) for j, t in enumerate(y)]
    assert model.history_[0] == pytest.approx(float(np.mean(loss)), rel=1e-4)


# ---------------------------------------------------------------- the estimator contract


def test_fit_recovers_planted_classes_and_predicts_at_any_size() -> None:
    classes: list = []
    feats, props = blobs(classes=classes)
    model = fit(feats, props, steps=30)
    assert isinstance(model, SemanticEstimator)
    assert model.prototypes_.shape == (3, 16) and model.gain_.shape == (3,)
    preds = []
    for f in feats:
        pred = model.predict(f, size=(24, 48), factor=2)
        assert pred.shape == (24, 48) and pred.dtype == torch.int64
        assert model.logits(f, factor=2).shape == (3, 12, 24)
        preds.append(pred.numpy().ravel())
    truth = [np.kron(c, np.ones((4, 4), dtype=np.int64)).ravel() for c in classes]
    assert adjusted_rand_score(np.concatenate(truth), np.concatenate(preds)) > 0.95
    assert all(np.isfinite(model.history_))


@pytest.mark.parametrize("classifier", ["reference", "cosine"])
def test_state_dict_round_trip_predicts_identically(classifier: str, tmp_path) -> None:
    feats, props = blobs()
    cfg = PriMaPsEMConfig(num_classes=3, steps=12, batch_size=4, classifier=classifier,
                          center=True)
    model = PriMaPsEM(cfg).fit(FitInputs(feats, proposals=props))
    state = model.state_dict()
    assert set(state) == {"prototypes", "gain", "running", "running_gain", "mean"}
    save_file(state, str(tmp_path / "w.safetensors"))
    again = PriMaPsEM.from_state(cfg, load_file(str(tmp_path / "w.safetensors")), device="cpu")
    for f in feats:
        assert torch.equal(again.logits(f, 2), model.logits(f, 2))
        assert torch.equal(again.predict(f, (13, 29), 2), model.predict(f, (13, 29), 2))
    del state["mean"]
    with pytest.raises(UnsegError, match="lacks tensor 'mean'"):
        PriMaPsEM.from_state(cfg, state)
    with pytest.raises(UnsegError, match="do not fit K=4"):
        PriMaPsEM.from_state(PriMaPsEMConfig(num_classes=4), model.state_dict())
    with pytest.raises(UnsegError, match="'gain' holds NaN or infinite values"):
        PriMaPsEM.from_state(cfg, {**model.state_dict(), "gain": torch.full((3,), float("inf"))})
    width = feats[0].shape[0]
    with pytest.raises(UnsegError, match=f"PriMaPs-EM: 2-channel features, but the prototypes "
                                         f"are {width}-channel"):
        again.logits(feats[0][:2])


def test_center_subtracts_the_fitted_mean_and_ignores_a_common_shift() -> None:
    feats, props = blobs()
    model = fit(feats, props, steps=12, center=True)
    stacked = np.concatenate([f.numpy().reshape(16, -1) for f in feats], axis=1)
    np.testing.assert_allclose(model.mean_.numpy(), stacked.mean(1), rtol=1e-5, atol=1e-6)
    f = feats[0]
    expect = prototype_logits(f - model.mean_[:, None, None], model.prototypes_, model.gain_,
                              "reference", 2)
    torch.testing.assert_close(model.logits(f, 2), expect)
    assert "mean" not in fit(feats, props, steps=1).state_dict()
    shift = torch.linspace(-3, 3, 16)[:, None, None]
    moved = fit([x + shift for x in feats], props, steps=12, center=True)
    torch.testing.assert_close(moved.prototypes_, model.prototypes_, atol=1e-4, rtol=1e-4)
    for x in feats:
        assert torch.equal(moved.predict(x + shift, (6, 12)), model.predict(x, (6, 12)))


def test_fixed_seed_gives_identical_runs() -> None:
    feats, props = blobs()
    a = fit(feats, props, steps=12, seed=7)
    b = fit(feats, props, steps=12, seed=7)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key])
    assert a.history_ == b.history_


def test_proposals_are_held_as_int16_and_any_integer_dtype_fits_the_same() -> None:
    feats, props = blobs()
    model = PriMaPsEM(PriMaPsEMConfig(num_classes=3, batch_size=4))
    views = model._views(feats, props, None)
    assert all(v.proposals.dtype == torch.int16 for v in views)
    assert torch.equal(views[0].proposals.long(), props[0].reshape(-1))
    wide = fit(feats, props, steps=8, seed=3)
    narrow = fit(feats, [p.to(torch.int16) for p in props], steps=8, seed=3)
    assert wide.history_ == narrow.history_
    assert torch.equal(wide.prototypes_, narrow.prototypes_)


def test_student_features_train_theta_but_e_step_uses_clean_view() -> None:
    feats, props = blobs()
    student = [f + 0.05 for f in feats]
    a = fit(feats, props, steps=5)
    b = fit(feats, props, student, steps=5)
    assert not torch.equal(a.running_, b.running_)
    # with the clean view as student, passing it explicitly changes nothing
    c = fit(feats, props, list(feats), steps=5)
    assert torch.equal(a.running_, c.running_) and a.history_ == c.history_


def _fit_in_group(rank: int, world: int, store: str, out: str) -> None:
    """One rank of a gloo group: the same fit as in one process; rank 0 saves the state."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                         world_size=world)
    try:
        feats, props = blobs()
        model = fit(feats, props, [f * 1.2 for f in feats], steps=12)
        if rank == 0:
            state = model.state_dict()
            state["history"] = torch.tensor(model.history_)
            save_file(state, out)
        torch.distributed.barrier()  # no rank tears gloo down while another still talks to it
    finally:
        torch.distributed.destroy_process_group()


def test_two_processes_fit_like_one(tmp_path) -> None:
    """Each rank takes its share of every batch; summed gradients and focal statistics give
    the single-process fit (θ, θ_m and the logged losses)."""
    out = str(tmp_path / "ddp.safetensors")
    mp.spawn(_fit_in_group, args=(2, str(tmp_path / "store"), out), nprocs=2, join=True)
    two = load_file(out)
    feats, props = blobs()
    one = fit(feats, props, [f * 1.2 for f in feats], steps=12)
    for key, value in one.state_dict().items():
        torch.testing.assert_close(two[key], value, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(two["history"].numpy(), one.history_, rtol=1e-5)


def test_pca_directions_match_numpy_svd() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(400, 10, generator=g) * torch.linspace(4, 0.5, 10)
    d = pca_directions(x, 3)
    xc = x.double().numpy() - x.double().numpy().mean(0)
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    np.testing.assert_allclose(np.abs((vt[:3] * d.double().numpy()).sum(1)), 1.0, atol=1e-5)


def test_adam_is_torchs_bit_for_bit() -> None:
    g = torch.Generator().manual_seed(5)
    ours = [torch.randn(5, 7, generator=g).requires_grad_(True), torch.ones(5, requires_grad=True)]
    theirs = [p.detach().clone().requires_grad_(True) for p in ours]
    mine, reference = Adam(ours, lr=5e-3), torch.optim.Adam(theirs, lr=5e-3)
    for _ in range(30):
        grads = [torch.randn(p.shape, generator=g) * 10 ** float(torch.randint(-6, 2, (1,),
                                                                             generator=g))
                 for p in ours]
        for p, q, grad in zip(ours, theirs, grads, strict=True):
            p.grad, q.grad = grad.clone(), grad.clone()
        mine.step()
        reference.step()
        for p, q in zip(ours, theirs, strict=True):
            assert torch.equal(p, q)


def _probe_by_hand(features, init, batch_size, seed, epochs, lr):
    """The reference's probe spelled out: explicit one-hot of the argmax, torch's own Adam."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.nn.Parameter(init.clone())
    optimiser = torch.optim.Adam([v], lr=lr)
    for _ in range(epochs):
        order = torch.randperm(len(features), generator=gen).tolist()
        for start in range(0, len(features), batch_size):
            x = torch.cat([features[i].reshape(features[i].shape[0], -1).T
                           for i in order[start:start + batch_size]])
            cos = (x / x.norm(dim=1, keepdim=True)) @ (v / v.norm(dim=1, keepdim=True)).T
            onehot = F.one_hot(cos.argmax(dim=1), init.shape[0]).float()
            loss = -(onehot * cos).sum() / x.shape[0]
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return (v / v.norm(dim=1, keepdim=True)).detach()


def test_probe_initialisation_is_the_reference_probe_spelled_out() -> None:
    feats, _ = blobs(n_images=7, seed=2)
    init = pca_directions(torch.cat([f.reshape(16, -1).T for f in feats]), 3)
    got = probe_kmeans(feats, init, 3, torch.Generator().manual_seed(9), epochs=2, lr=5e-3)
    want = _probe_by_hand(feats, init, 3, 9, 2, 5e-3)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(got, F.normalize(init, dim=1), atol=1e-3)  # it moved


def test_probe_initialisation_raises_the_cosine_objective_and_fits() -> None:
    classes: list = []
    feats, props = blobs(n_images=8, seed=4, classes=classes)
    rows = F.normalize(torch.cat([f.reshape(16, -1).T for f in feats]), dim=1)
    init = pca_directions(rows, 3)
    probed = probe_kmeans(feats, init, 4, torch.Generator().manual_seed(0), epochs=20, lr=5e-2)

    def objective(v: torch.Tensor) -> float:
        return float((rows @ F.normalize(v, dim=1).T).max(dim=1).values.mean())

    assert objective(probed) > objective(init) + 0.05
    model = fit(feats, props, steps=30, init="probe")
    preds = [model.predict(f, size=(6, 12)).numpy().ravel() for f in feats]
    truth = np.concatenate([c.ravel() for c in classes])
    assert adjusted_rand_score(truth, np.concatenate(preds)) > 0.95


@pytest.mark.parametrize("size", [8, 64])
def test_top_eigenvectors_are_numpys(size: int) -> None:
    """Lanczos (k below size / 2) and eigh (the others) give numpy's eigenvectors, largest
    eigenvalue first."""
    g = torch.Generator().manual_seed(4)
    a = torch.randn(3 * size, size, generator=g, dtype=torch.float64) * torch.linspace(
        5, 0.1, size, dtype=torch.float64)
    m = a.T @ a
    _, v = np.linalg.eigh(m.numpy())
    for k in (1, 3, size // 2 + 1):
        got = top_eigenvectors(m, k).numpy()
        assert got.shape == (size, k)
        np.testing.assert_allclose(np.abs((got * v[:, ::-1][:, :k]).sum(0)), 1.0, atol=1e-10)


def test_bad_inputs() -> None:
    feats, props = blobs(n_images=1)
    with pytest.raises(UnsegError, match="at least 2"):
        fit(feats, props, num_classes=1)
    with pytest.raises(UnsegError, match="larger than the number of feature vectors"):
        fit(feats, props, num_classes=100)
    with pytest.raises(UnsegError, match="1 feature maps but 0"):
        PriMaPsEM().fit(FitInputs(feats, proposals=[]))
    with pytest.raises(UnsegError, match=r"needs FitInputs\.proposals"):
        PriMaPsEM().fit(FitInputs(feats))
    with pytest.raises(UnsegError, match="unknown classifier"):
        fit(feats, props, classifier="linear")
    with pytest.raises(UnsegError, match="unknown init"):
        fit(feats, props, init="random")
    with pytest.raises(UnsegError, match="one to one"):
        fit(feats, props, feats + feats)
    with pytest.raises(UnsegError, match="before fit"):
        PriMaPsEM().predict(feats[0], (6, 12))
    with pytest.raises(UnsegError, match="not been fitted"):
        PriMaPsEM().state_dict()


# ------------------------------------------------------- planted classes against k-means


def planted(seed: int, k: int = 4, dim: int = 16, noise: float = 1.2, n_images: int = 16):
    """Features of ``k`` planted classes sharing a large common component, one class per
    quadrant of each 8x8 map plus isotropic noise; proposals = the quadrants at twice the
    resolution (top row ignored); returns (features, proposals, class maps)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, dim, generator=g) + 3.0 * torch.randn(dim, generator=g)
    quadrant = torch.arange(4).view(2, 2).repeat_interleave(4, 0).repeat_interleave(4, 1)
    feats, props, truth = [], [], []
    for _ in range(n_images):
        cls = torch.randint(0, k, (4,), generator=g)[quadrant]
        feats.append(centers[cls].permute(2, 0, 1) + noise * torch.randn(dim, 8, 8, generator=g))
        p = quadrant.repeat_interleave(2, 0).repeat_interleave(2, 1).clone()
        p[0] = 255
        props.append(p)
        truth.append(cls.numpy())
    return feats, props, truth


def matched_accuracy(truth: list[np.ndarray], pred: list[np.ndarray], k: int) -> float:
    """Pixel accuracy after the Hungarian matching of predicted ids to classes."""
    t = np.concatenate([x.ravel() for x in truth])
    p = np.concatenate([x.ravel() for x in pred])
    confusion = np.zeros((k, k))
    np.add.at(confusion, (t, p), 1)
    rows, cols = linear_sum_assignment(-confusion)
    return float(confusion[rows, cols].sum() / confusion.sum())


def test_reference_em_recovers_planted_classes_at_least_as_well_as_kmeans() -> None:
    em_acc, km_acc = [], []
    for seed in range(3):
        feats, props, truth = planted(seed)
        km = KMeans(KMeansConfig(num_classes=4, seed=0)).fit(FitInputs(feats))
        em = PriMaPsEM(PriMaPsEMConfig(num_classes=4, steps=60, batch_size=8)).fit(
            FitInputs(feats, proposals=props)
        )
        km_acc.append(matched_accuracy(truth, [km.predict(f, (8, 8)).numpy() for f in feats], 4))
        em_acc.append(matched_accuracy(truth, [em.predict(f, (8, 8)).numpy() for f in feats], 4))
    assert np.mean(em_acc) >= np.mean(km_acc)
    assert min(em_acc) > 0.9


def test_the_learning_rate_defaults_by_classifier_and_an_explicit_one_wins() -> None:
    assert learning_rate(PriMaPsEMConfig(classifier="reference")) == 5e-3  # the paper's
    assert learning_rate(PriMaPsEMConfig(classifier="cosine")) == 1e-3
    assert learning_rate(PriMaPsEMConfig(classifier="cosine", lr=0.02)) == 0.02
    with pytest.raises(UnsegError, match=r"lr must be above 0, got 0\.0"):
        PriMaPsEMConfig(lr=0.0)
    # the default and the rate it stands for train identically; another rate does not
    feats, props = blobs()
    runs = {lr: PriMaPsEM(PriMaPsEMConfig(num_classes=3, classifier="cosine", lr=lr, steps=5))
            .fit(FitInputs(feats, proposals=props)).running_ for lr in (None, 1e-3, 5e-3)}
    assert torch.equal(runs[None], runs[1e-3]) and not torch.allclose(runs[None], runs[5e-3])
    assert PriMaPsEM(PriMaPsEMConfig(classifier="cosine")).config.lr == 1e-3  # saved as it ran


def test_the_lr_option_is_optional_on_the_command_line() -> None:
    import argparse

    from unseg.cli.options import add_method_options, given_options
    from unseg.registry import get_method

    spec = get_method("primaps-em")
    parser = argparse.ArgumentParser()
    add_method_options(parser, [spec])
    assert given_options(parser.parse_args([]), spec) == {}
    assert given_options(parser.parse_args(["--lr", "0.002"]), spec) == {"lr": 0.002}
