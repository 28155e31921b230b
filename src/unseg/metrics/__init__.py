"""Metrics: semantic (Hungarian), saliency (Acc/IoU/maxFβ/MAE), CorLoc."""
