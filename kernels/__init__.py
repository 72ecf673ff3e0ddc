"""Triton kernels of the ``triton`` backend (installed as ``cblr_ext.kernels``).

``chunks``: the multi-tensor chunk and pointer tables, two-stage per-layer sums;
``reduce``: pass 1 (norms, non-finite flag, median histograms); ``median``: the
radix-select step; ``update``: pass 2; ``closure``: CBLR's save/shift/secant/restore.
Importing this package imports triton; ``cblr_ext`` itself does not.
"""
