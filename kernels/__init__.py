"""Triton kernels of the ``triton`` backend (installed as ``cblr_ext.kernels``).

``chunks``: the multi-tensor chunk and pointer tables, two-stage per-layer sums;
``reduce``: pass 1 (Σw², Σg², non-finite flag, CBLR's secant sums, median histograms);
``median``: the radix-select step; ``update``: pass 2 (from the probe's saved w_t where
given); ``closure``: CBLR's probe primitives (save-and-shift with Σw_t², restore) and the
secant difference pass 1 sums; ``adam``: the Adam base's two passes (LAMB and the median
rule on the Adam direction).
Importing this package imports triton; ``cblr_ext`` itself does not.
"""
