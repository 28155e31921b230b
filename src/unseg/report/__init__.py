"""Human-facing outputs: label palettes and image/mask overlays."""
