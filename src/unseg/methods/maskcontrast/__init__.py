"""MaskContrast: pixel embeddings from contrasting salient-object mask proposals (methods.md §4).

A head on the frozen backbone's dense features — ASPP-style parallel dilated 3x3 convs, a 1x1
branch and image pooling, a 1x1 projection, a 3x3 conv (``width``, BN, ReLU), then a 1x1 conv to
a ``embed_dim``-d embedding (with bias) and a 1x1 conv (no bias) to one saliency logit, both
upsampled bilinearly — and its momentum copy (``m = 0.999``, parameters only, updated before the
keys are computed), as the reference.

One step on a batch of images, each seen in two views (query, key):

- key prototype of image i = L2-normalise(Σ over the key view's salient pixels of the
  L2-normalised key embeddings);
- every salient query pixel (L2-normalised) gets logits ``[q·P_batchᵀ, q·queueᵀ] / T`` against
  the batch's prototypes and a FIFO queue of past prototypes (all-gathered across torchrun
  processes), target = its image; cross-entropy weighted per image by ``1/ln(1.02 + p_i)`` (p_i =
  image i's share of the salient query pixels), ``reduction="mean"``;
- plus the class-balanced BCE of the query's saliency logit against its mask (weight 1);
- SGD (momentum 0.9, weight decay 1e-4), lr × ``(1 − epoch/epochs)^0.9`` per epoch; lr 0.01 at
  batch 16 by default (the paper's 0.004 at batch 128: see :class:`MaskContrastConfig`).

Views: random resized crop (scale 0.2–1, aspect 3/4–4/3), horizontal flip; both views of an image
are re-drawn (``max_redraws`` times, then the whole image is used) until the salient area of each
lies strictly between 1 % and 99 %.

**CPU deviation.** The backbone is frozen, so a view's features are not recomputed: they are
cropped and resampled from the full image's feature map (RoI-align: ``grid_sample``, 2x2 samples
per output cell), and the mask is cropped the same way. This costs one backbone pass per image
for the whole run instead of two per image per epoch. What it loses: the colour jitter
(0.4/0.4/0.4/0.1, p = 0.8) and greyscale (p = 0.2) cannot act on cached features, so the head no
longer learns invariance to them. It is recovered where it can act: when
``FitInputs.student_features`` are given (features of a photometrically jittered copy of each
image, e.g. by :func:`photometric_view`), the query view is cut from them and the key view from
the plain features. A crop is also resampled from features that saw the whole image (the
backbone's context and receptive field differ from a real crop's), and the crop's features come
at the full image's stride rather than at ``view_size / stride`` of a resized crop.

**Last stage trainable** (``train_last_stage``; the reference fine-tunes its backbone): the
features are then the maps *before* the backbone's last stage
(:meth:`unseg.backbones.base.Backbone.last_stage`), cached as above, and a copy of that stage,
initialised with the backbone's weights, runs on every view in front of the decoder, trained
with it (same SGD settings), carried by the momentum copy and saved with the head; its BatchNorm
statistics stay the backbone's (eval mode), only its weights move. ``stage_of``
(``"backbone:tap"``, set by the pipeline) lets a saved run rebuild the stage. CNN taps only.

Resume: every random draw is seeded from ``(seed, epoch, image)`` (views) or ``(seed, epoch)``
(batch order), so the epoch number is the run's whole RNG state; the checkpoint written after
every epoch (model, momentum model, queue, SGD buffers, epoch, losses) resumes to the same
weights as an uninterrupted run.

Evaluation (the paper's per-image k-means protocol): one vector per image = Σ of the raw
embeddings weighted by the model's saliency logit where it exceeds 0.5, L2-normalised; PCA(32,
whitened); Euclidean k-means (20 clusters); salient pixels take cluster + 1, the rest 0.
:func:`backbone_prototypes` gives the same protocol on plain backbone features (the baseline).

Modules: :mod:`.config` (the settings), :mod:`.model` (the head, its momentum copy, the losses
and the prototype queue), :mod:`.views` (view sampling and the photometric copy),
:mod:`.protocol` (the evaluation protocol: PCA, k-means, image prototypes) and
:mod:`.estimator` (training, resume checkpoints, saved state, prediction). Every name is
importable from this package.
"""

from unseg.methods.maskcontrast.config import MaskContrastConfig
from unseg.methods.maskcontrast.estimator import CHECKPOINT, MaskContrast
from unseg.methods.maskcontrast.model import (
    MaskContrastHead,
    PrototypeQueue,
    balanced_bce,
    contrastive_loss,
    gather_rows,
    image_weights,
    momentum_update,
)
from unseg.methods.maskcontrast.protocol import (
    PrototypeClusters,
    backbone_prototypes,
    cluster_prototypes,
    kmeans,
    kmeans_protocol,
    pca_fit,
    pca_whiten,
    weighted_prototype,
)
from unseg.methods.maskcontrast.views import (
    Box,
    ViewPair,
    crop_features,
    crop_mask,
    draw_views,
    photometric_view,
    sample_crop_box,
    view_cells,
)

__all__ = [
    "CHECKPOINT",
    "Box",
    "MaskContrast",
    "MaskContrastConfig",
    "MaskContrastHead",
    "PrototypeClusters",
    "PrototypeQueue",
    "ViewPair",
    "backbone_prototypes",
    "balanced_bce",
    "cluster_prototypes",
    "contrastive_loss",
    "crop_features",
    "crop_mask",
    "draw_views",
    "gather_rows",
    "image_weights",
    "kmeans",
    "kmeans_protocol",
    "momentum_update",
    "pca_fit",
    "pca_whiten",
    "photometric_view",
    "sample_crop_box",
    "view_cells",
    "weighted_prototype",
]
