"""Methods: cosine k-means, PriMaPs-EM, the saliency heads, linear probe."""
