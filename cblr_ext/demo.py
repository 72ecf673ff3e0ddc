"""``python -m cblr_ext``: a short run of the large-batch study (``python -m cblr_ext.experiments
--preset quick``): the synthetic teacher task at a small and a large batch with SGD (linear lr
scaling and warm-up) beside LARS, MCLR and CBLR, the lr of each picked on a validation split;
a few minutes on 2 CPU cores."""
from __future__ import annotations

from .experiments.cli import build_parser, run

INTRO = """\
Large-batch study, short version: a 3-layer MLP learns a synthetic teacher-student task
(10% label noise, so memorising hurts) for the same number of epochs at a small and a
large batch. SGD scales its lr linearly with the batch (with warm-up), the common
large-batch recipe; LARS, MCLR and CBLR set a learning rate per layer from its curvature.
Every run's lr comes from a 3-point grid scored on a validation split; the test split is
only reported. `python -m cblr_ext.experiments` runs the full study (docs/experiments.md).
"""


def main(argv=None) -> int:
    parser = build_parser("python -m cblr_ext", __doc__, "quick")
    args = parser.parse_args(argv)
    print(INTRO)
    return run(args)
