"""Shared CLI contract: every command that takes --backbone takes --weights; fitted runs check
that their backbone weights are the ones they were fitted with."""

from __future__ import annotations

import subprocess
import sys

import pytest

from unseg.backbones import backbone_weights_sha256, create_backbone, create_fitted_backbone
from unseg.cli.main import build_parser, parse_args
from unseg.errors import UnsegError

COMMANDS = [
    ["features", "d", "--out", "o"],
    ["fit", "primaps-em", "d", "-k", "3", "--out", "o"],
    ["fit", "kmeans", "d", "-k", "3", "--out", "o"],
    ["fit", "saliency", "d", "--out", "o"],
    ["segment", "d", "--out", "o"],
    ["discover", "d", "--out", "o"],
]


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda a: " ".join(a[:2]))
def test_backbone_commands_take_weights(argv):
    args = build_parser().parse_args([*argv, "--backbone", "dino_vits8", "--weights", "w.pth"])
    assert args.backbone == "dino_vits8" and args.weights == "w.pth"


LOGGED = [*COMMANDS, ["predict", "run", "imgs", "--out", "o"], ["report", "o"],
          ["evaluate", "semantic", "--pred", "p", "--gt", "g", "--num-classes", "3"]]


@pytest.mark.parametrize("argv", LOGGED, ids=lambda a: " ".join(a[:2]))
def test_verbose_and_quiet_may_follow_the_command(argv):
    """`unseg segment ... -q` was "unrecognized arguments": -v/-q worked only before the
    command. Now either place counts, the -v counts add up, and nothing else is left behind
    (the settings --resume compares are the same either way)."""
    before = parse_args(["-v", "-q", *argv])
    after = parse_args([*argv, "-v", "-q"])
    assert vars(after) == vars(before)
    assert (after.verbose, after.quiet) == (1, True)
    assert parse_args(["-v", *argv, "-vv"]).verbose == 3
    plain = parse_args(argv)
    assert (plain.verbose, plain.quiet) == (0, False)
    assert set(vars(plain)) == set(vars(after))


def test_predict_takes_weights():
    args = build_parser().parse_args(["predict", "run", "imgs", "--out", "o", "--weights", "w"])
    assert args.weights == "w"


def test_fitted_backbone_hash_is_checked():
    model = create_backbone("efficientnet_lite0", device="cpu")
    sha = backbone_weights_sha256(model)
    same = create_fitted_backbone("efficientnet_lite0", sha, device="cpu", source="runs/a")
    assert backbone_weights_sha256(same) == sha
    with pytest.raises(UnsegError, match=r"runs/a: fitted with efficientnet_lite0 .*--weights"):
        create_fitted_backbone("efficientnet_lite0", "0" * 64, device="cpu", source="runs/a")


def test_random_backbones_are_fingerprinted_by_their_parameters():
    a = create_backbone("dino_vits16", pretrained=False)
    b = create_backbone("dino_vits16", pretrained=False)
    assert a.weights_sha256 is None
    assert backbone_weights_sha256(a) == backbone_weights_sha256(a)
    assert backbone_weights_sha256(a) != backbone_weights_sha256(b)


def test_parser_does_not_import_matplotlib():
    """Building the parser (every command does) leaves matplotlib for the report to import:
    it costs most of a second on a small folder."""
    code = ("import sys; from unseg.cli.main import build_parser; build_parser(); "
            "print('matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_python_dash_m_unseg_is_the_command() -> None:
    """`python -m unseg` said "No module named unseg.__main__" (a venv whose scripts are not
    on PATH, or a scheduler that runs python only)."""
    import unseg

    done = subprocess.run([sys.executable, "-m", "unseg", "--version"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == f"unseg {unseg.__version__}"
    bad = subprocess.run([sys.executable, "-m", "unseg", "segment"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "usage: unseg segment" in bad.stderr


def test_default_feature_size_is_resolved_in_one_place(monkeypatch):
    """The default feature size was read from ``size is None`` in four places (the semantic
    kind, the MaskContrast kind, the embedding run check, the CLI's resolution check); now
    ``Settings.feature_size`` is the one, so the constant changed reaches them all, while
    ``size`` stays None when none was given (``--resume`` tells ``--size 320`` from none)."""
    from unseg.cli import common
    from unseg.pipelines import kind, semantic
    from unseg.pipelines.kind import Settings
    from unseg.pipelines.kinds import create_kind

    monkeypatch.setattr(kind, "DEFAULT_SIZE", 96)
    assert Settings().feature_size == 96 and Settings(size=320).feature_size == 320
    backbone = "efficientnet_lite0"
    assert create_kind("kmeans", 3, None, Settings(backbone=backbone)).settings.size == 96
    assert create_kind("maskcontrast", None, None, Settings(backbone=backbone)).settings.size == 96
    meta = {"backbone": backbone, "tap": None, "max_side": 0}  # a run that predates feature_size
    monkeypatch.setattr(semantic, "load_run", lambda run: (meta, None))
    assert semantic._embedding_backbone(Settings(embeddings="run")).size == 96

    checked = []
    monkeypatch.setattr(common, "check_resolution", lambda size, *rest: checked.append(size))
    argv = ["segment", "d", "--out", "o", "--backbone", backbone]
    none = common.run_settings(parse_args(argv), "segment")
    given = common.run_settings(parse_args([*argv, "--size", "320"]), "segment")
    assert checked == [96, 320]
    assert none.size is None and given.size == 320  # what was given, not the resolved size
