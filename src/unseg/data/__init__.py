"""Image loading, dataset layouts and transforms."""

from unseg.data.image import IMAGE_EXTENSIONS, list_images, load_image, load_label

__all__ = ["IMAGE_EXTENSIONS", "list_images", "load_image", "load_label"]
