"""Refinement: guided filter and dense CRF."""
