"""Mask proposals: PriMaPs (principal mask proposals) and spectral bipartition."""
