"""Backbones: registry, taps, DINO/DINOv2 ViTs, EfficientNet-Lite0/1/2, weight files.

Importing this package registers every named backbone.
"""

from unseg.backbones import efficientnet, vit
from unseg.backbones.base import (
    Backbone,
    BackboneSpec,
    FeatureKind,
    LastStage,
    SizePolicy,
    Tap,
    WeightsSpec,
    build_backbone,
    get_spec,
    list_backbones,
    register_backbone,
)
from unseg.backbones.create import (
    backbone_weights_sha256,
    create_backbone,
    create_fitted_backbone,
    default_backbone_name,
    default_backbone_reason,
)
from unseg.backbones.weights import WeightsStatus, unseg_home, weights_status

__all__ = [
    "Backbone",
    "BackboneSpec",
    "FeatureKind",
    "LastStage",
    "SizePolicy",
    "Tap",
    "WeightsSpec",
    "WeightsStatus",
    "backbone_weights_sha256",
    "build_backbone",
    "create_backbone",
    "create_fitted_backbone",
    "default_backbone_name",
    "default_backbone_reason",
    "efficientnet",
    "get_spec",
    "list_backbones",
    "register_backbone",
    "unseg_home",
    "vit",
    "weights_status",
]
