"""``python -m cblr_ext.experiments``: the large-batch study (docs/experiments.md)."""
