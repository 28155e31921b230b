"""Backbones: registry, DINO/DINOv2 ViTs, EfficientNet-Lite0, weight files."""

from unseg.backbones.base import (
    Backbone,
    BackboneSpec,
    FeatureKind,
    WeightsSpec,
    build_backbone,
    get_spec,
    list_backbones,
    register_backbone,
)

__all__ = [
    "Backbone",
    "BackboneSpec",
    "FeatureKind",
    "WeightsSpec",
    "build_backbone",
    "get_spec",
    "list_backbones",
    "register_backbone",
]
