"""unseg: unsupervised image segmentation on frozen self-supervised backbones."""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
