"""The sweeps ``--preset`` names: "quick" (the package's main job, a few minutes on 2 cores),
"full" (the study in docs/experiments.md), "mnist1d" (the sweep behind the defaults) and
"mnist1d-edge", "mnist1d-edge2", "mnist1d-edge3" (the three rounds of the ×√2 screen of
issue 21)."""
from .optimizers import EDGE_ROUNDS, OPTIMIZERS
from .run import VARIANTS
from .sweep import SweepConfig

# The ×√2 screen is of MNIST-1D at one batch size: the full study leaves it out.
_SCREENED = {name for names in EDGE_ROUNDS.values() for name in names}

PRESETS = {
    "quick": dict(tasks=[("teacher", "mlp")], batch_sizes={"teacher": [128, 8192]}, epochs={"teacher": 20},
                  optimizers=["SGD", "LARS", "MCLR", "CBLR-k1"], variants=["plain"], seeds=2, train_size=16384),
    "full": dict(tasks=[("teacher", "mlp"), ("digits", "cnn")],
                 batch_sizes={"teacher": [128, 512, 2048, 8192], "digits": [64, 256, 1024]},
                 epochs={"teacher": 20, "digits": 20}, optimizers=[name for name in OPTIMIZERS if name not in _SCREENED],
                 variants=list(VARIANTS),
                 variant_batch_sizes={"teacher": [8192], "digits": [1024]},
                 variant_optimizers=["SGD", "LARS", "MCLR", "CBLR-k1"], seeds=3, train_size=16384),
    # the sweep behind the defaults (docs/experiments.md, "MNIST-1D")
    "mnist1d": dict(tasks=[("mnist1d", "mlp")], batch_sizes={"mnist1d": [256, 1024, 4096, 8192]},
                    epochs={"mnist1d": 30}, optimizers=["SGD", "LARS", "MCLR", "CBLR-k1"], variants=["plain"],
                    seeds=3, select="mean"),
    # the ×√2 screen near each rule's edge at batch 4096, every lr on every seed, three rounds
    **{f"mnist1d-edge{'' if k == 1 else k}": dict(
        tasks=[("mnist1d", "mlp")], batch_sizes={"mnist1d": [4096]}, epochs={"mnist1d": 30},
        optimizers=list(names), variants=["plain"], seeds=3, select="mean") for k, names in EDGE_ROUNDS.items()},
}


def preset_config(name: str) -> SweepConfig:
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    return SweepConfig(**PRESETS[name])
