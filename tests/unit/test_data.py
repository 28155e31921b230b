"""Dataset layouts and loaders, on tiny fixture trees in the official layouts and on real data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat

from unseg.data.datasets import (
    Cityscapes27,
    COCOStuff27,
    ImageFolder,
    Potsdam3,
    SaliencyDataset,
    VOCBoxes,
    VOCSegmentation,
    dataset_images,
)
from unseg.data.labels import COCOSTUFF_FINE_TO_27
from unseg.data.layouts import LAYOUTS, find_layout, resolve_image_dir
from unseg.errors import InputFileError, ManyFilesError, UnsegError

H, W = 6, 8


def _rgb(path: Path, seed: int = 0, size: tuple[int, int] = (H, W)) -> np.ndarray:
    arr = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return arr


def _label(path: Path, values: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(values.astype(np.uint8), "P" if palette else "L")
    if palette:
        img.putpalette(list(range(256)) * 3)
    img.save(path)


def _labels(values: list[int]) -> np.ndarray:
    """An ``[H, W]`` label whose first row starts with ``values`` (rest repeats the last)."""
    out = np.full((H, W), values[-1], dtype=np.uint8)
    out[0, : len(values)] = values
    return out


def make_saliency(root: Path, image_dir: str, gt_dir: str, stems=("a", "b")) -> Path:
    for i, s in enumerate(stems):
        _rgb(root / image_dir / f"{s}.jpg", i)
        _label(root / gt_dir / f"{s}.png", _labels([0, 127, 128, 255]))
    return root


def _voc_xml(path: Path, objects: list[tuple[str, tuple[int, int, int, int], int, int]]) -> None:
    objs = "".join(
        f"<object><name>{n}</name><truncated>{t}</truncated><difficult>{d}</difficult>"
        f"<bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax>"
        "</bndbox></object>"
        for n, b, d, t in objects
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"<annotation><filename>{path.stem}.jpg</filename><size><width>{W}</width>"
        f"<height>{H}</height><depth>3</depth></size>{objs}</annotation>"
    )


def make_voc(root: Path, year: str = "2012", stems=("2008_000001", "2008_000002")) -> Path:
    voc = root / "VOCdevkit" / f"VOC{year}"
    for i, s in enumerate(stems):
        _rgb(voc / "JPEGImages" / f"{s}.jpg", i)
        _label(voc / "SegmentationClass" / f"{s}.png", _labels([0, 15, 255, 20]), palette=True)
        _voc_xml(
            voc / "Annotations" / f"{s}.xml",
            [("person", (1, 2, 4, 5), 0, 0), ("dog", (3, 1, W, H), 1, 1)],
        )
    for split in ("ImageSets/Segmentation/val.txt", "ImageSets/Main/trainval.txt"):
        (voc / split).parent.mkdir(parents=True, exist_ok=True)
        (voc / split).write_text("\n".join(stems[:1]) + "\n")
    return voc


def make_coco(root: Path) -> Path:
    for i, s in enumerate(["000000000139", "000000000285", "000000000632"]):
        _rgb(root / "images" / "val2017" / f"{s}.jpg", i)
        _label(root / "annotations" / "val2017" / f"{s}.png", _labels([0, 91, 170, 177, 181, 255]))
    _rgb(root / "images" / "train2017" / "000000000009.jpg")
    curated = root / "curated" / "val2017" / "Coco164kFull_Stuff_Coarse_7.txt"
    curated.parent.mkdir(parents=True)
    curated.write_text("000000000139\n000000000632\n")
    return root


def make_cityscapes(root: Path) -> Path:
    for city, n in (("frankfurt", 2), ("lindau", 1)):
        for k in range(n):
            stem = f"{city}_000000_00001{k}"
            _rgb(root / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png", k)
            gt = root / "gtFine" / "val" / city
            _label(gt / f"{stem}_gtFine_labelIds.png", _labels([0, 6, 7, 8, 26, 33, 34]))
            _label(gt / f"{stem}_gtFine_instanceIds.png", _labels([1]))
            _rgb(gt / f"{stem}_gtFine_color.png")
    return root


def make_potsdam(root: Path, float_img: bool = False) -> Path:
    rng = np.random.default_rng(0)
    (root / "imgs").mkdir(parents=True)
    (root / "gt").mkdir()
    for name in ("0_0_0", "0_0_1", "1_2_3"):
        img = rng.integers(0, 256, (H, W, 4), dtype=np.uint8)
        savemat(root / "imgs" / f"{name}.mat", {"img": img / 255.0 if float_img else img})
        savemat(root / "gt" / f"{name}.mat", {"gt": _labels([0, 1, 2, 3, 4, 5, 255])})
    (root / "labelled_test.txt").write_text("0_0_1\n1_2_3\n")
    (root / "labelled_train.txt").write_text("0_0_0\n")
    return root


# ---------------------------------------------------------------- layouts


@pytest.mark.parametrize(
    ("name", "build"),
    [
        ("ECSSD", lambda r: make_saliency(r, "images", "ground_truth_mask")),
        ("DUTS-TE", lambda r: make_saliency(r, "DUTS-TE-Image", "DUTS-TE-Mask")),
        ("DUT-OMRON", lambda r: make_saliency(r, "DUT-OMRON-image", "pixelwiseGT-new-PNG")),
        ("COCO-Stuff-27", make_coco),
        ("Cityscapes-27", make_cityscapes),
        ("Potsdam-3", make_potsdam),
    ],
)
def test_find_layout_by_subfolders_not_by_name(tmp_path, name, build):
    root = build(tmp_path / "some_neutral_name")
    layout = find_layout(root)
    assert layout is not None and layout.name == name
    assert layout.root == root
    assert layout.image_path.is_dir() and layout.gt_path.is_dir()
    assert layout == LAYOUTS[name].__class__(**{**LAYOUTS[name].__dict__, "root": root})


def test_folder_named_like_a_dataset_is_not_one(tmp_path):
    for name in ("ECSSD", "VOC2012", "cityscapes"):
        (tmp_path / name).mkdir()
        assert find_layout(tmp_path / name) is None
    assert find_layout(tmp_path / "absent") is None


def test_voc_layout_from_devkit_parent_and_above(tmp_path):
    voc = make_voc(tmp_path / "pascal", "2012")
    for root in (voc, voc.parent, voc.parent.parent):
        layout = find_layout(root)
        assert layout.name == "VOC2012" and layout.root == voc
        assert layout.split_path == voc / "ImageSets" / "Segmentation" / "val.txt"
        boxes = find_layout(root, task="boxes")
        assert boxes.name == "VOC2012-boxes" and boxes.gt_path == voc / "Annotations"
    assert find_layout(voc, task="saliency") is None


def test_voc_devkit_with_two_years_is_ambiguous(tmp_path):
    voc12 = make_voc(tmp_path / "p", "2012")
    make_voc(tmp_path / "p", "2007")
    assert find_layout(voc12.parent) is None
    assert find_layout(voc12.parent.parent) is None
    assert find_layout(voc12.parent / "VOC2007").name == "VOC2007"


def test_resolve_image_dir(tmp_path):
    root = make_saliency(tmp_path / "e", "images", "ground_truth_mask")
    assert resolve_image_dir(root) == root / "images"
    assert resolve_image_dir(root / "images") == root / "images"
    plain = tmp_path / "plain"
    _rgb(plain / "x.png")
    assert resolve_image_dir(plain) == plain
    voc = make_voc(tmp_path / "v")
    assert resolve_image_dir(tmp_path / "v") == voc / "JPEGImages"


def test_real_layouts(shared_data):
    ecssd = shared_data("ECSSD")
    assert find_layout(ecssd).name == "ECSSD"
    assert resolve_image_dir(ecssd) == ecssd / "images"
    assert find_layout(ecssd / "images") is None
    voc12 = shared_data("VOC2012")
    assert find_layout(voc12).name == "VOC2012"
    assert find_layout(voc12 / "VOCdevkit").root == voc12 / "VOCdevkit" / "VOC2012"
    voc07 = shared_data("VOC2007")
    assert find_layout(voc07, task="boxes").name == "VOC2007-boxes"
    assert find_layout(voc07, task="semantic").name == "VOC2007"


# ---------------------------------------------------------------- datasets


def test_saliency_dataset_binarises_at_128(tmp_path):
    root = make_saliency(tmp_path / "d", "DUT-OMRON-image", "pixelwiseGT-new-PNG")
    ds = SaliencyDataset(root)
    assert len(ds) == 2
    s = ds[1]
    assert s["stem"] == "b" and s["path"] == root / "DUT-OMRON-image" / "b.jpg"
    assert s["image"].dtype == torch.uint8 and s["image"].shape == (3, H, W)
    assert s["mask"].dtype == torch.bool
    assert s["mask"][0, :4].tolist() == [False, False, True, True]


def test_saliency_missing_mask_is_named(tmp_path):
    root = make_saliency(tmp_path / "d", "images", "ground_truth_mask")
    _rgb(root / "images" / "c.jpg")
    (root / "ground_truth_mask" / "a.png").unlink()
    with pytest.raises(ManyFilesError, match="missing ground truth") as info:
        SaliencyDataset(root)
    assert str(root / "ground_truth_mask" / "a.png") in str(info.value)
    assert str(root / "ground_truth_mask" / "c.png") in str(info.value)


def test_saliency_size_mismatch_is_an_error(tmp_path):
    root = make_saliency(tmp_path / "d", "images", "ground_truth_mask")
    _label(root / "ground_truth_mask" / "a.png", np.zeros((3, 3)))
    with pytest.raises(InputFileError, match="does not match"):
        SaliencyDataset(root)[0]


def test_wrong_dataset_class_for_root(tmp_path):
    root = make_saliency(tmp_path / "d", "images", "ground_truth_mask")
    with pytest.raises(UnsegError, match="not a VOC2012"):
        VOCSegmentation(root)


def test_voc_segmentation_reads_split_and_palette_indices(tmp_path):
    make_voc(tmp_path / "v")
    ds = VOCSegmentation(tmp_path / "v")
    assert len(ds) == 1 and ds[0]["stem"] == "2008_000001"
    assert ds[0]["label"].dtype == torch.int64
    assert ds[0]["label"][0, :4].tolist() == [0, 15, 255, 20]
    assert len(VOCSegmentation(tmp_path / "v", split_file=_split(tmp_path, ["2008_000002"]))) == 1


def _split(tmp_path: Path, stems: list[str]) -> Path:
    path = tmp_path / "split.txt"
    path.write_text("\n".join(stems))
    return path


def test_voc_boxes_all_objects(tmp_path):
    make_voc(tmp_path / "v")
    s = VOCBoxes(tmp_path / "v")[0]
    assert s["names"] == ["person", "dog"]
    assert s["boxes"].tolist() == [[0, 1, 4, 5], [2, 0, W, H]]
    assert s["difficult"].tolist() == [False, True]
    assert s["truncated"].tolist() == [False, True]
    assert s["size"] == (H, W)


def test_cocostuff27_curated_list_and_mapping(tmp_path):
    root = make_coco(tmp_path / "cocostuff")
    ds = COCOStuff27(root)
    assert [s for s, _, _ in ds.pairs] == ["000000000139", "000000000632"]
    # STEGO: person(0)→9, banner(91)→17 textile, 170→18 wall, 177→26 water, 181→24, 255 ignored
    assert ds[0]["label"][0, :6].tolist() == [9, 17, 18, 26, 24, 255]
    assert len(COCOSTUFF_FINE_TO_27) == 182 and set(COCOSTUFF_FINE_TO_27) == set(range(27))


def test_cocostuff27_without_curated_list_is_an_error(tmp_path):
    root = make_coco(tmp_path / "cocostuff")
    (root / "curated" / "val2017" / "Coco164kFull_Stuff_Coarse_7.txt").unlink()
    with pytest.raises(InputFileError, match="split file"):
        COCOStuff27(root)


def test_cityscapes27_pairs_and_mapping(tmp_path):
    root = make_cityscapes(tmp_path / "cityscapes")
    ds = Cityscapes27(root)
    assert [s for s, _, _ in ds.pairs] == [
        "frankfurt/frankfurt_000000_000010",
        "frankfurt/frankfurt_000000_000011",
        "lindau/lindau_000000_000010",
    ]
    # ids 0..6 void → ignore; 7 road → 0; 8 → 1; 26 car → 19; 33 bicycle → 26; 34 → ignore
    assert ds[0]["label"][0, :7].tolist() == [255, 255, 0, 1, 19, 26, 255]
    assert ds.classes[19] == "car" and ds.classes[26] == "bicycle"


@pytest.mark.parametrize("float_img", [False, True])
def test_potsdam3_mat_tiles(tmp_path, float_img):
    root = make_potsdam(tmp_path / "potsdam", float_img)
    ds = Potsdam3(root)
    assert [s for s, _, _ in ds.pairs] == ["0_0_1", "1_2_3"]
    s = ds[0]
    assert s["image"].shape == (3, H, W) and s["image"].dtype == torch.uint8
    from scipy.io import loadmat

    raw = loadmat(root / "imgs" / "0_0_1.mat")["img"][..., :3]
    expected = np.round(raw * 255) if float_img else raw
    assert np.array_equal(s["image"].permute(1, 2, 0).numpy(), expected.astype(np.uint8))
    # roads/cars (0, 4) → 0, buildings/clutter (1, 5) → 1, vegetation/trees (2, 3) → 2
    assert s["label"][0, :7].tolist() == [0, 1, 2, 2, 0, 1, 255]


def test_image_folder_and_dataset_images(tmp_path):
    _rgb(tmp_path / "f" / "z.png")
    _rgb(tmp_path / "f" / "sub" / "a.jpg")
    ds = ImageFolder(tmp_path / "f")
    assert [s.name for s in ds.paths] == ["a.jpg", "z.png"]
    assert ds[1]["image"].shape == (3, H, W) and ds[1]["stem"] == "z"
    make_voc(tmp_path / "v")
    assert [p.stem for p in dataset_images(tmp_path / "v")] == ["2008_000001"]
    root = make_saliency(tmp_path / "e", "images", "ground_truth_mask")
    assert dataset_images(root) == [root / "images" / "a.jpg", root / "images" / "b.jpg"]
    potsdam = make_potsdam(tmp_path / "p")  # labelled_test.txt's tiles, not the train one
    tiles = potsdam / "imgs"
    assert dataset_images(potsdam) == [tiles / "0_0_1.mat", tiles / "1_2_3.mat"]


def test_transform_is_applied(tmp_path):
    root = make_saliency(tmp_path / "d", "images", "ground_truth_mask")
    ds = SaliencyDataset(root, transform=lambda s: {**s, "mask": s["mask"].flip(-1)})
    assert ds[0]["mask"][0, -4:].tolist() == [True, True, False, False]


def test_real_datasets(shared_data):
    ecssd = SaliencyDataset(shared_data("ECSSD"))
    assert len(ecssd) == 1000
    s = ecssd[0]
    assert s["mask"].shape == s["image"].shape[1:] and 0 < s["mask"].float().mean() < 1
    voc = VOCSegmentation(shared_data("VOC2012"))
    assert len(voc) == 217
    labels = torch.unique(voc[0]["label"])
    assert set(labels.tolist()) <= set(range(21)) | {255}
    boxes = VOCBoxes(shared_data("VOC2007"))
    assert len(boxes) == 422
    assert len(VOCSegmentation(shared_data("VOC2007"))) == 422
    b = boxes[0]
    assert b["boxes"].shape[1] == 4 and (b["boxes"][:, 2] <= b["size"][1]).all()
