"""Class balance of label maps: counts against numpy's bincount, shares, the nearly-empty rule,
the message, the PNG reader and the log."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from unseg.errors import UnsegError
from unseg.methods.balance import (
    balance_message,
    class_counts,
    class_shares,
    log_class_balance,
    nearly_empty,
    read_labels,
    shares_line,
)


def test_counts_equal_numpy_bincount_over_all_maps_and_skip_ids_beyond_k() -> None:
    rng = np.random.default_rng(0)
    maps = [rng.integers(0, 7, size=(5, 9)).astype(np.uint8) for _ in range(4)]
    expected = np.bincount(np.concatenate([m.ravel() for m in maps]), minlength=7)
    np.testing.assert_array_equal(class_counts(maps, 7), expected)
    np.testing.assert_array_equal(class_counts(maps, 5), expected[:5])  # 5 and 6 not counted
    with pytest.raises(UnsegError):
        class_counts(maps, 0)


def test_shares_sum_to_one_and_an_empty_set_gives_zeros() -> None:
    shares = class_shares(np.array([6, 3, 1, 0]))
    np.testing.assert_allclose(shares, [0.6, 0.3, 0.1, 0.0])
    np.testing.assert_array_equal(class_shares(np.zeros(3, dtype=np.int64)), np.zeros(3))


def test_nearly_empty_is_under_a_tenth_of_the_uniform_share() -> None:
    # K = 4: uniform 25 %, limit 2.5 %
    shares = np.array([0.70, 0.276, 0.024, 0.0])
    assert nearly_empty(shares) == [2, 3]
    assert nearly_empty(np.array([0.7, 0.25, 0.026, 0.024])) == [3]
    assert nearly_empty(shares, fraction=0.001) == [3]
    assert nearly_empty(np.full(5, 0.2)) == []


def test_message_names_the_classes_and_their_shares() -> None:
    assert balance_message(np.full(4, 0.25)) is None
    msg = balance_message(np.array([0.70, 0.276, 0.024, 0.0]))
    assert msg is not None
    assert "2 of 4 classes" in msg and "2.50 %" in msg
    assert "2: 2.40 %" in msg and "3: 0.00 %" in msg
    assert shares_line(np.array([0.5, 0.25, 0.25])) == "0: 50.0 %, 1: 25.0 %, 2: 25.0 %"


def test_palette_pngs_are_read_as_class_ids_and_logged(tmp_path, caplog) -> None:
    paths = []
    for i, fill in enumerate([0, 1, 1]):
        lab = np.full((4, 5), fill, dtype=np.uint8)
        lab[0, 0] = 2
        im = Image.fromarray(lab).convert("P")
        im.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)  # ids, not colours
        paths.append(tmp_path / f"{i}.png")
        im.save(paths[-1])
    got = list(read_labels(paths))
    assert got[0][0, 0] == 2 and got[1][1, 1] == 1
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    assert len(list(read_labels([paths[0], broken, paths[1]]))) == 2  # skipped, not raised
    with caplog.at_level(logging.INFO, logger="unseg.methods.balance"):
        shares = log_class_balance(paths, 4)
    np.testing.assert_allclose(shares, [19 / 60, 38 / 60, 3 / 60, 0.0])
    assert "class shares of the predicted pixels" in caplog.text
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "3: 0.00 %" in warned[0].getMessage()


def test_an_unreadable_mask_is_left_out_of_the_counts(tmp_path, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="unseg.methods.balance")
    good = tmp_path / "good.png"
    Image.fromarray(np.array([[0, 1], [1, 1]], dtype=np.uint8), mode="L").save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(good.read_bytes()[:20])
    counts = class_counts(read_labels([bad, good]), 2)
    assert counts.tolist() == [1, 3]
    assert "bad.png" in caplog.text
