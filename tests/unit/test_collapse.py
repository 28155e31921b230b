"""Collapse detection: fires on constant, all-foreground/background and diverged heads only."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

from unseg.errors import UnsegError
from unseg.methods.collapse import CollapseCheck, CollapseConfig, oversized_expected
from unseg.methods.found import FoundConfig, FoundHead
from unseg.methods.saliency import SaliencyHead, SaliencyHeadConfig
from unseg.methods.saliency_head import SaliencyHeadNet


def _maps(n: int = 10, seed: int = 0) -> torch.Tensor:
    """Sound maps ``[n, 1, 32, 32]``: a bright square of random size on a dark background."""
    gen = torch.Generator().manual_seed(seed)
    maps = 0.1 * torch.rand(n, 1, 32, 32, generator=gen)
    for i in range(n):
        side = int(torch.randint(8, 20, (1,), generator=gen))
        maps[i, :, 4 : 4 + side, 6 : 6 + side] += 0.8
    return maps


def _verdict(maps: torch.Tensor, history=(1.0, 0.5), config=None) -> str:
    check = CollapseCheck(config)
    for chunk in maps.split(3):
        check.update(chunk)
    return check.report(history).verdict


def _constant_head(bias: float, channels: int = 4) -> FoundHead:
    head = FoundHead(FoundConfig())
    head.net = nn.Conv2d(channels, 1, 1)
    nn.init.zeros_(head.net.weight)
    nn.init.constant_(head.net.bias, bias)
    return head


@pytest.mark.parametrize(("bias", "verdict"), [(3.0, "constant"), (-3.0, "constant")])
def test_fires_on_a_constant_output_head(bias, verdict):
    head = _constant_head(bias)
    feats = torch.randn(6, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    report = head.check_collapse(feats, torch.zeros(6, 3, 32, 32))
    assert report.verdict == verdict and report.failed
    assert report.frac_constant == 1.0
    assert report.mean_foreground == (1.0 if bias > 0 else 0.0)
    assert verdict in report.message()


def test_fires_on_a_constant_saliency_head():
    head = SaliencyHead(SaliencyHeadConfig(dim=8, layers=1, heads=2))
    head.net = SaliencyHeadNet(4, 8, 8, 1, 2)
    nn.init.zeros_(head.net.coarse.weight)
    nn.init.constant_(head.net.coarse.bias, 2.0)  # the stages' logit layers start at zero
    feats = torch.randn(5, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    images = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    report = head.check_collapse(feats, images)
    assert report.verdict == "constant" and report.mean_foreground == 1.0


def test_quiet_on_a_good_map_set_and_a_trained_head():
    report = CollapseCheck()
    report.update(_maps())
    result = report.report([0.9, 0.6, 0.5])
    assert result.verdict == "ok" and not result.failed
    # the shares by hand: each map's square over 32x32
    gen = torch.Generator().manual_seed(0)
    torch.rand(10, 1, 32, 32, generator=gen)
    sides = [int(torch.randint(8, 20, (1,), generator=gen)) for _ in range(10)]
    assert result.mean_foreground == pytest.approx(sum(s * s for s in sides) / 10 / 1024)


def test_all_foreground_and_all_background_need_nearly_all_images():
    maps = _maps(20)
    full = maps.clone()
    full[:19] = 0.6 + 0.3 * maps[:19]  # 19 of 20 images (95 %) above 0.5 everywhere, not constant
    assert _verdict(full) == "all-foreground"
    empty = 0.4 * maps
    assert _verdict(empty) == "all-background"
    some = maps.clone()
    some[:18] = 0.4 * maps[:18]  # 90 %: below the 95 % bar
    assert _verdict(some) == "ok"
    assert _verdict(some, config=CollapseConfig(fraction=0.9)) == "all-background"


def test_mostly_foreground_over_the_set_fires_though_no_rule_per_image_does():
    maps = _maps(20)
    most = maps.clone()
    # 12 of 20 images entirely foreground (60 %: below the 95 % bar), the rest 85 % foreground
    most[:12] = 0.6 + 0.3 * maps[:12]
    most[12:] = 1.0
    most[12:, :, :, :5] = 0.0
    share = float((most > 0.5).float().mean())
    assert 0.9 < share < 0.98
    assert _verdict(most) == "mostly-foreground"
    assert _verdict(most, config=CollapseConfig(max_mean_foreground=0.95)) == "oversized"
    loose = CollapseConfig(max_mean_foreground=0.95, max_typical_foreground=0.95)
    assert _verdict(most, config=loose) == "ok"


def test_oversized_masks_fire_between_the_typical_and_the_mostly_foreground_share():
    maps = torch.zeros(10, 1, 10, 10)
    maps[:, :, :7] = 0.8  # 70 % of every map foreground, no map constant or all-foreground
    report = CollapseCheck()
    report.update(maps)
    result = report.report([0.5, 0.4])
    assert result.verdict == "oversized" and result.flagged and not result.failed
    assert result.as_dict()["flagged"] and not result.as_dict()["failed"]
    assert result.mean_foreground == pytest.approx(0.7)
    assert "70%" in result.message() and "training images" in result.message()
    assert "predicted images" in result.message("prediction")
    maps[:, :, 5:7] = 0.2  # 50 %: a large object, not oversized
    assert _verdict(maps) == "ok"
    assert _verdict(maps, config=CollapseConfig(max_typical_foreground=0.4)) == "oversized"


def _report(maps: torch.Tensor):
    check = CollapseCheck()
    check.update(maps)
    return check.report([0.5, 0.4])


def test_an_expected_oversized_flag_is_an_info_line_with_its_reason(caplog):
    """Inside ``oversized_expected`` an oversized verdict is logged at INFO with the caller's
    reason instead of the advice to change seed or method; outside it, and for a collapse
    inside it, the warning stays."""
    log = logging.getLogger("unseg.test_collapse")
    large = torch.zeros(10, 1, 10, 10)
    large[:, :, :7] = 0.8  # 70 %: oversized
    allfg = torch.ones(10, 1, 10, 10)
    allfg[:, :, 0, 0] = 0.0  # all-foreground, not constant
    with caplog.at_level(logging.INFO, logger=log.name):
        _report(large).log(log)
        with oversized_expected("the caller asked for large masks"):
            _report(large).log(log, "prediction")
            _report(allfg).log(log)
            _report(_maps()).log(log)  # sound maps: nothing
        _report(large).log(log)
    levels = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert [lv for lv, _ in levels] == [logging.WARNING, logging.INFO, logging.WARNING,
                                        logging.WARNING]
    assert "use another seed" in levels[0][1] and "use another seed" in levels[3][1]
    assert levels[1][1].endswith("expected here: the caller asked for large masks")
    assert "predicted images" in levels[1][1] and "use another seed" not in levels[1][1]
    assert "all-foreground" in levels[2][1]


@pytest.mark.parametrize(
    "history", [(1.0, math.nan), (1.0, math.inf, 0.5), (0.5, 0.2, 3.0)]
)
def test_diverged_training(history):
    assert _verdict(_maps(), history) == "diverged"


def test_nonfinite_maps_and_no_maps():
    maps = _maps()
    maps[2, 0, 0, 0] = math.nan
    assert _verdict(maps) == "diverged"
    assert _verdict(_maps(), (0.5, 0.2, 1.9)) == "ok"  # grew, but not 10x
    with pytest.raises(UnsegError, match="no predicted maps"):
        CollapseCheck().report([1.0])
    with pytest.raises(UnsegError, match="expected maps"):
        CollapseCheck().update(torch.zeros(2, 3, 4, 4))


def test_report_is_json_able():
    import json

    check = CollapseCheck()
    check.update(_maps())
    d = check.report([1.0]).as_dict()
    assert json.loads(json.dumps(d))["verdict"] == "ok" and d["failed"] is False
