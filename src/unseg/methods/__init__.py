"""Methods: cosine k-means, PriMaPs-EM, the saliency heads, MaskContrast, linear probe.

Importing this package registers the built-in methods (each module's ``@register``), in this
order: the order ``unseg fit --help`` and :func:`unseg.registry.list_methods` show.
"""

from unseg.methods import found, kmeans, maskcontrast, primaps_em, saliency

__all__ = ["found", "kmeans", "maskcontrast", "primaps_em", "saliency"]
