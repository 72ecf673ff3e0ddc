"""The sweeps ``--preset`` names: "quick" (the package's main job: MNIST-1D at batch 256 and
4096, under 5 minutes on 2 cores), "quick-teacher" (the same comparison on the synthetic
teacher task), "full" (the study in docs/experiments.md), "mnist1d" (the sweep behind the
defaults), "mnist1d-edge", "mnist1d-edge2", "mnist1d-edge3" (the three rounds of the ×√2
screen near each rule's edge of stability) and "adam" (AdamW, LAMB and the median rule on the
Adam direction, MNIST-1D and the teacher task)."""
from .optimizers import EDGE_ROUNDS
from .run import VARIANTS
from .sweep import SweepConfig

# The main job's grids, three points of each optimizer's ×2 grid around where the MNIST-1D
# sweep (docs/experiments.md) found the best lr at batch 256 and 4096 (SGD's 0.2 at 256 is
# left out: 24 runs of 15 epochs fit in the 5 minutes).
QUICK_LR_GRIDS = {"SGD": (0.025, 0.05, 0.1), "LARS": (16.0, 32.0, 64.0), "MCLR": (4.0, 8.0, 16.0),
                  "CBLR-k1": (0.4, 0.8, 1.6)}
MAIN_OPTIMIZERS = ["SGD", "LARS", "MCLR", "CBLR-k1"]
ADAM_OPTIMIZERS = ["AdamW", "LAMB", "LAMB-mclr", "LAMB-cblr"]

PRESETS = {
    "quick": dict(tasks=[("mnist1d", "mlp")], batch_sizes={"mnist1d": [256, 4096]}, epochs={"mnist1d": 15},
                  optimizers=MAIN_OPTIMIZERS, variants=["plain"], seeds=1, lr_grids=QUICK_LR_GRIDS),
    "quick-teacher": dict(tasks=[("teacher", "mlp")], batch_sizes={"teacher": [128, 8192]}, epochs={"teacher": 20},
                          optimizers=MAIN_OPTIMIZERS, variants=["plain"], seeds=2, train_size=16384),
    # the study of docs/experiments.md: the four rules, CBLR also re-measuring every 4th and 16th step
    "full": dict(tasks=[("teacher", "mlp"), ("digits", "cnn")],
                 batch_sizes={"teacher": [128, 512, 2048, 8192], "digits": [64, 256, 1024]},
                 epochs={"teacher": 20, "digits": 20}, optimizers=MAIN_OPTIMIZERS + ["CBLR-k4", "CBLR-k16"],
                 variants=list(VARIANTS),
                 variant_batch_sizes={"teacher": [8192], "digits": [1024]},
                 variant_optimizers=MAIN_OPTIMIZERS, seeds=3, train_size=16384),
    # the sweep behind the defaults (docs/experiments.md, "MNIST-1D")
    "mnist1d": dict(tasks=[("mnist1d", "mlp")], batch_sizes={"mnist1d": [256, 1024, 4096, 8192]},
                    epochs={"mnist1d": 30}, optimizers=MAIN_OPTIMIZERS, variants=["plain"], seeds=3, select="mean"),
    # the ×√2 screen near each rule's edge at batch 4096, every lr on every seed, three rounds
    **{f"mnist1d-edge{'' if k == 1 else k}": dict(
        tasks=[("mnist1d", "mlp")], batch_sizes={"mnist1d": [4096]}, epochs={"mnist1d": 30},
        optimizers=list(names), variants=["plain"], seeds=3, select="mean") for k, names in EDGE_ROUNDS.items()},
    # the Adam base (docs/experiments.md, "The Adam base"): 10 epochs; the recorded run also
    # took --lr-points 3 to fit about 40 minutes of the shared 2-core VM
    "adam": dict(tasks=[("mnist1d", "mlp"), ("teacher", "mlp")],
                 batch_sizes={"mnist1d": [256, 4096, 8192], "teacher": [256, 4096, 8192]},
                 epochs={"mnist1d": 10, "teacher": 10}, optimizers=ADAM_OPTIMIZERS, variants=["plain"], seeds=3,
                 train_size=16384),
}


def preset_config(name: str) -> SweepConfig:
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    return SweepConfig(**PRESETS[name])
