"""``python -m cblr_ext``: the package's main job, a short large-batch comparison
(``python -m cblr_ext.experiments --preset quick``): MNIST-1D at a small and a large batch with
SGD (linear lr scaling and warm-up) beside LARS, MCLR and CBLR, the lr of each picked on a
validation split; under 5 minutes on 2 CPU cores. ``--task teacher`` runs the same comparison
on the synthetic teacher task."""
from __future__ import annotations

from .experiments.cli import build_parser, run

# the preset each --task starts from (an explicit --preset wins)
TASK_PRESETS = {"mnist1d": "quick", "teacher": "quick-teacher"}

INTRO = {
    "mnist1d": """\
Large-batch training, short version: an MLP (40-256-256-10) learns MNIST-1D (32,000
generated 1-D digit sequences; 4,000 of the training ones are the validation split) for
15 epochs at batch 256 and at batch 4096, so the large batch takes 16x fewer steps.
SGD scales its lr linearly with the batch (with warm-up), the common large-batch recipe;
LARS, MCLR and CBLR set a learning rate per layer from its curvature. Each optimizer's lr
is the best of a short grid on the validation split; the test split is only reported.
`python -m cblr_ext.experiments --preset mnist1d` runs the full sweep (docs/experiments.md).
""",
    "teacher": """\
Large-batch training, short version: a 3-layer MLP learns a synthetic teacher-student task
(10% label noise, so memorising hurts) for the same number of epochs at a small and a
large batch. SGD scales its lr linearly with the batch (with warm-up), the common
large-batch recipe; LARS, MCLR and CBLR set a learning rate per layer from its curvature.
Every run's lr is the best of a grid on a validation split; the test split is only reported.
""",
}


def main(argv=None) -> int:
    parser = build_parser("python -m cblr_ext", __doc__, "quick")
    parser.add_argument("--task", choices=sorted(TASK_PRESETS), default="mnist1d",
                        help="mnist1d (the --preset quick) or teacher (--preset quick-teacher)")
    args = parser.parse_args(argv)
    if args.task != "mnist1d" and args.preset == "quick":
        args.preset = TASK_PRESETS[args.task]
    print(INTRO[args.task])
    return run(args)
