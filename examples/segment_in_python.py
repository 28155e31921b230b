"""Segment the bundled example photos from Python, as `unseg segment` and `unseg discover` do.

    python examples/segment_in_python.py [--out out/python] [--backbone NAME] [--size 320]

Writes OUT/classes-<photo>.png (class ids scaled to be visible) and OUT/object-<photo>.png
(the 8-bit foreground probability), and prints each photo's classes and object box. The
defaults are the commands' (320-pixel working short side, the default backbone); a smaller
--size runs faster.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

import unseg

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default=str(HERE / "images"), help="a folder of photos")
    parser.add_argument("--out", default="out/python", help="where the masks go")
    parser.add_argument("--backbone", default=None, help="see unseg.list_backbones()")
    parser.add_argument("--size", type=int, default=320, help="working short side in pixels")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    photos = sorted(Path(args.images).glob("*.jpg"))
    images = [Image.open(p) for p in photos]  # paths, PIL images or HxWx3 uint8 arrays

    # semantic classes shared by the photos: k-means on the frozen backbone's features
    seg = unseg.Segmenter("kmeans", num_classes=4, backbone=args.backbone, size=args.size)
    classes = seg.fit_predict(images)  # one HxW uint8 array of class ids per photo

    # the salient object of each photo, training-free
    finder = unseg.Segmenter("spectral", backbone=args.backbone, image_size=args.size)
    objects = finder.fit_predict(images)  # one HxW uint8 foreground probability per photo
    boxes = finder.predict_boxes(images)

    for photo, labels, mask, box in zip(photos, classes, objects, boxes, strict=True):
        Image.fromarray((labels * (255 // 3)).astype(np.uint8)).save(
            out / f"classes-{photo.stem}.png")
        Image.fromarray(mask).save(out / f"object-{photo.stem}.png")
        print(f"{photo.name}: {labels.shape[1]}x{labels.shape[0]}, classes "
              f"{sorted(np.unique(labels).tolist())}, object box {box}")


if __name__ == "__main__":
    main()
