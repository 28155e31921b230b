"""The one place that names the files and folders of runs and output folders.

A command's output folder ``OUT`` (``segment``, ``discover``, ``predict``)::

    OUT/unseg-manifest.json   what wrote each file (unseg.outdir)
    OUT/masks/<name>.png      one mask per input image (its path under the images folder)
    OUT/overlays/<name>.jpg   the masks over the images (semantic methods)
    OUT/boxes.json            the box of each mask (saliency methods)
    OUT/report.html           the report (unseg.report)
    OUT/run/                  the fitted model (segment, discover with a trained method)
    OUT/discover/             MaskContrast's saliency masks (segment --method maskcontrast)

A run folder (``unseg.runs``; ``unseg fit --out``, ``OUT/run``, :meth:`unseg.Segmenter.save`)::

    RUN/config.json           the method, its config and what prediction needs
    RUN/weights.safetensors   the estimator's state
    RUN/train_prototypes.safetensors   MaskContrast: the training images' prototypes
    RUN/cache/                features and pseudo-labels (unless --cache-dir)

The run, the report, ``evaluate`` and ``predict`` read these names from here.
"""

MANIFEST_FILE = "unseg-manifest.json"
MASKS_DIR = "masks"
OVERLAYS_DIR = "overlays"
BOXES_FILE = "boxes.json"
REPORT_FILE = "report.html"
RUN_DIR = "run"
DISCOVER_DIR = "discover"

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"
TRAIN_PROTOTYPES = "train_prototypes.safetensors"
CACHE_DIR = "cache"
FEATURES_DIR = "features"  # under a cache folder: what `unseg features --out` writes into
