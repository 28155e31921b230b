"""The segment path stays on the backbone's device: no host copies between the features and the
labels (issue 19 item 4).

There is no GPU here, so the test watches the calls instead: every ``Tensor.cpu()``,
``Tensor.numpy()`` and ``.to("cpu")`` made while the proposals, their CRF, the EM, the
prediction and its refinement run is recorded (a torch function mode) with the function that
made it (``.to`` only with the string ``"cpu"``: here the CPU device stands for the backbone's).
On a CUDA device each of them would be a round trip through the host. The only ones
allowed are the CPU-only fast paths, which a CUDA tensor never takes (ARPACK in the
proposals' ``top_eigenvector`` and the EM's ``top_eigenvectors``, OpenCV in ``guided_filter``),
and the labels' final trip to the PNG writer (``upsample_argmax``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from unseg.feature_store import FeatureRecord, FeatureSet
from unseg.methods.base import FitInputs
from unseg.methods.primaps_em import PriMaPsEM, PriMaPsEMConfig
from unseg.pipelines.label_maps import PredictSettings, refined_probabilities
from unseg.pipelines.pseudo_labels import compute_pseudo_labels
from unseg.proposals.primaps import PriMaPsConfig
from unseg.refine.crf import CRFPool, crf_probabilities
from unseg.refine.semantic import RefineConfig, refine_logits
from unseg.utils.batch import BatchReport
from unseg.utils.timing import Timings

ALLOWED = {"top_eigenvector", "top_eigenvectors", "guided_filter", "upsample_argmax"}


class HostCopies(TorchFunctionMode):
    """Records ``(function, caller)`` of each host copy made inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, str]] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        # a literal "cpu" (a torch.device is where the caller was told to compute: here the
        # CPU stands for the backbone's device)
        to_cpu = name == "to" and "cpu" in (*args[1:], kwargs.get("device"))
        if name in ("cpu", "numpy") or to_cpu:
            frame = sys._getframe(1)
            while frame.f_code.co_name.startswith("<") and frame.f_back is not None:
                frame = frame.f_back  # a comprehension's frame: its function's
            caller = frame.f_code.co_name
            if caller not in ALLOWED:
                self.seen.append((name, caller))
        return func(*args, **kwargs)


def _scene(seed: int = 0) -> tuple[FeatureSet, list[Path]]:
    """Two images with planted regions and their features ``[16, 6, 8]`` (stride 8) in memory."""
    g = torch.Generator().manual_seed(seed)
    tensors, records, paths = {}, {}, []
    for i in range(2):
        regions = torch.zeros(6, 8, dtype=torch.long)
        regions[:3, 3:] = 1
        regions[3:, : 4 + i] = 2
        centres = torch.randn(3, 16, generator=g) * 2
        feats = (centres[regions] + 0.1 * torch.randn(6, 8, 16, generator=g)).permute(2, 0, 1)
        colours = torch.tensor([[200, 40, 40], [40, 200, 40], [40, 40, 200]], dtype=torch.uint8)
        image = colours[regions].permute(2, 0, 1)
        image = image.repeat_interleave(8, 1).repeat_interleave(8, 2).contiguous()
        sha = f"sha{i}"
        tensors |= {(sha, "features"): feats.contiguous(), (sha, "image"): image,
                    (sha, "flipped"): feats.flip(-1).contiguous()}
        path = Path(f"img{i}.png")
        records[path] = FeatureRecord(sha, (48, 64), (48, 64), (16, 6, 8))
        paths.append(path)
    return FeatureSet(records, BatchReport(), None, tensors), paths


@pytest.mark.parametrize("refine", ["crf", "guided+crf", "none"])
def test_proposals_em_prediction_and_refinement_make_no_host_copies(refine: str) -> None:
    feats, paths = _scene()
    timings = Timings()
    with CRFPool(1) as pool, HostCopies() as copies:
        labels = compute_pseudo_labels(paths, feats, None, PriMaPsConfig(), pool, timings)
        est = PriMaPsEM(PriMaPsEMConfig(num_classes=3, steps=3, batch_size=2), "cpu")
        est.fit(FitInputs(features=[feats[p] for p in paths], proposals=labels))
        out = list(refined_probabilities(est, feats, paths, PredictSettings(refine=refine),
                                         torch.device("cpu"), pool, timings))
    assert copies.seen == []
    assert len(labels) == 2 and labels[0].shape == (48, 64)
    for _, q, _ in out:
        assert q.shape == (3, 48, 64)
        torch.testing.assert_close(q.sum(0), torch.ones(48, 64))


def test_the_crf_and_the_refinement_take_a_tensor_image_with_the_arrays_result() -> None:
    g = torch.Generator().manual_seed(1)
    image = torch.randint(0, 256, (24, 32, 3), dtype=torch.uint8, generator=g)
    logits = torch.randn(4, 24, 32, generator=g)
    with HostCopies() as copies:
        q = crf_probabilities(image, logits)
        r = refine_logits(logits, image, RefineConfig("guided+crf"))
    assert copies.seen == []
    torch.testing.assert_close(q, crf_probabilities(image.numpy(), logits.numpy()))
    torch.testing.assert_close(r, refine_logits(logits, image.numpy(),
                                                RefineConfig("guided+crf")))
    assert isinstance(q, torch.Tensor) and q.device == logits.device


def test_the_watch_sees_a_host_copy() -> None:
    """The mode records what the segment path must not do."""
    with HostCopies() as copies:
        torch.ones(2).cpu()
        np.asarray(torch.ones(2).numpy())
        torch.ones(2).to("cpu")
    assert [name for name, _ in copies.seen] == ["cpu", "numpy", "to"]


def test_proposals_fit_and_prediction_give_freed_memory_back_per_chunk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each chunk of proposals and of predictions, and the end of a fit, trims the heap
    (``release_freed_memory``): without it the resident memory of a run grows with its folder
    (heap fragmentation, ``unseg.utils.allocator``)."""
    import unseg.pipelines.fitting as fitting
    import unseg.pipelines.label_maps as label_maps
    import unseg.pipelines.pseudo_labels as pseudo_labels
    from unseg.registry import get_method

    calls: list[str] = []
    for module in (fitting, label_maps, pseudo_labels):
        monkeypatch.setattr(module, "release_freed_memory",
                            lambda name=module.__name__: calls.append(name.rsplit(".", 1)[1]))
    monkeypatch.setattr(pseudo_labels, "CHUNK", 1)
    monkeypatch.setattr(label_maps, "CHUNK", 1)
    feats, paths = _scene()
    timings = Timings()
    with CRFPool(1) as pool:
        labels = compute_pseudo_labels(paths, feats, None, PriMaPsConfig(), pool, timings)
        assert calls == ["pseudo_labels"] * 2
        spec = get_method("primaps-em")
        config = PriMaPsEMConfig(num_classes=3, steps=3, batch_size=2)
        est = fitting.fit_estimator(spec, config, FitInputs(features=[feats[p] for p in paths],
                                                            proposals=labels),
                                    None, torch.device("cpu"), timings)  # type: ignore[arg-type]
        assert calls[2:] == ["fitting"] and isinstance(est, PriMaPsEM)
        out = refined_probabilities(est, feats, paths, PredictSettings(refine="none"),
                                    torch.device("cpu"), pool, timings)
        next(out)
        assert calls[3:] == []  # the first image is handed on before its chunk is trimmed
        assert len(list(out)) == 1
    assert calls[3:] == ["label_maps"] * 2


def test_ranks_list_the_missing_pseudo_labels_before_any_writes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    """Under torchrun every rank lists the missing pseudo-label files, then waits for the others
    before writing any: a rank that listed after another had written would shard a shorter
    list, and an image would fall to no rank (seen once in CI)."""
    import unseg.pipelines.pseudo_labels as pseudo_labels

    events: list[str] = []
    real_write = pseudo_labels.atomic_write
    monkeypatch.setattr(pseudo_labels.dist, "barrier", lambda: events.append("barrier"))
    monkeypatch.setattr(pseudo_labels, "atomic_write",
                        lambda *a, **k: (events.append("write"), real_write(*a, **k))[1])
    feats, paths = _scene()
    with CRFPool(1) as pool:
        labels = compute_pseudo_labels(paths, feats, tmp_path, PriMaPsConfig(), pool, Timings())
    assert events[0] == "barrier" and events.count("write") == 2
    assert len(labels) == 2


def test_overlapping_cpu_thread_blocks_in_threads_restore_the_count_from_before() -> None:
    """Two threads' cpu_threads blocks overlapping (predictions in a thread pool): each
    restored the count it found, and a thread started inside the first block finds its 1 (a
    new thread takes the count last set anywhere), so it restored 1 and every thread started
    afterwards ran torch on one thread."""
    import threading

    from unseg.utils.device import cpu_threads

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

        counts: dict[str, int] = {}

        def first() -> None:
            with cpu_threads("cpu", 1):
                a_in.set()
                b_in.wait(10)
            counts["first, after its block"] = torch.get_num_threads()
            a_out.set()

        def second() -> None:
            with cpu_threads("cpu", 1):
                b_in.set()
                a_out.wait(10)
                counts["second, in its block"] = torch.get_num_threads()

        a = threading.Thread(target=first)
        a.start()
        assert a_in.wait(10)
        b = threading.Thread(target=second)  # started inside the first block
        b.start()
        a.join(20)
        b.join(20)
        assert a_out.is_set() and b_in.is_set()
        seen: list[int] = []
        later = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        later.start()
        later.join(10)
        assert seen == [2]
        assert counts == {"first, after its block": 2, "second, in its block": 1}
    finally:
        torch.set_num_threads(before)


def test_the_pseudo_label_cache_removes_the_stale_temp_files_of_a_killed_run(
    tmp_path: Path,
) -> None:
    """The pseudo-labels, cached beside the features (``--cache-dir``), are written as the
    features are: a run killed mid-write left its temp file there for good; now the next run
    removes the stale ones (:func:`unseg.feature_store.remove_stale_temps`)."""
    import os
    import time

    from unseg.feature_store import STALE_TEMP_SECONDS

    feats, paths = _scene()
    stale = tmp_path / f".{'ab' * 32}.safetensors.k7x2q9pz.tmp"
    stale.write_bytes(b"partial")
    old = time.time() - STALE_TEMP_SECONDS - 60
    os.utime(stale, (old, old))
    with CRFPool(1) as pool:
        compute_pseudo_labels(paths, feats, tmp_path, PriMaPsConfig(), pool, Timings())
    assert not stale.exists() and len(list(tmp_path.glob("*.safetensors"))) == 2
