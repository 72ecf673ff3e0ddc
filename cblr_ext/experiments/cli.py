"""The command line of the experiment: options, the sweep, and what it writes."""
from __future__ import annotations

import argparse
import dataclasses
import os

from .data import DATASETS
from .models import MODELS
from .optimizers import OPTIMIZERS
from .plots import write_all
from .presets import PRESETS, preset_config
from .report import batch_effect, legend, table, write_json
from .run import VARIANTS, RunSpec, load_data
from .sweep import run_sweep


def _task(text):
    dataset, _, model = text.partition("/")
    if dataset not in DATASETS or model not in MODELS:
        raise argparse.ArgumentTypeError(f"a task is DATASET/MODEL with DATASET in {sorted(DATASETS)} and MODEL in "
                                         f"{sorted(MODELS)}, got {text!r} (the CNN needs images: digits/cnn)")
    return dataset, model


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults, except for the options whose default is the preset's."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help + " (default: the preset's)"
        return super()._get_help_string(action)


def _presets_epilog():
    lines = ["presets:"]
    for name, preset in PRESETS.items():
        tasks = ", ".join(f"{d}/{m} (batches {preset['batch_sizes'][d]}, {preset['epochs'][d]} epochs)"
                          for d, m in preset["tasks"])
        lines.append(f"  {name}: {tasks}; optimizers {', '.join(preset['optimizers'])}; "
                     f"variants {', '.join(preset['variants'])}; {preset['seeds']} seeds; "
                     f"teacher train size {preset['train_size']}")
    return "\n".join(lines)


def build_parser(prog, description, default_preset) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description, epilog=_presets_epilog(),
                                formatter_class=_Formatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=default_preset,
                   help="the sweep to start from; the options below override its parts")
    p.add_argument("--out", default="cblr-experiments",
                   help="folder for results.json, results.txt and the PNG plots (created)")
    p.add_argument("--tasks", nargs="+", type=_task, metavar="DATASET/MODEL",
                   help="tasks: teacher/mlp (synthetic teacher-student, label noise 10%%), digits/mlp, digits/cnn "
                        "(scikit-learn's bundled digits; needs scikit-learn)")
    p.add_argument("--batch-sizes", nargs="+", type=int, metavar="B",
                   help="batch sizes for every task (those over a task's training set are skipped)")
    p.add_argument("--epochs", type=int, help="epochs per run for every task (the same for every optimizer)")
    p.add_argument("--optimizers", nargs="+", choices=list(OPTIMIZERS), help="optimizers to compare")
    p.add_argument("--variants", nargs="+", choices=VARIANTS,
                   help="plain; discard (small-loss discarding); schedule (growing batch size)")
    p.add_argument("--variant-batch-sizes", nargs="+", type=int, metavar="B",
                   help="batch sizes at which the non-plain variants run")
    p.add_argument("--variant-optimizers", nargs="+", choices=list(OPTIMIZERS),
                   help="optimizers with which the non-plain variants run")
    p.add_argument("--seeds", type=int, help="seeds per configuration (seed 0 also picks the lr)")
    p.add_argument("--train-size", type=int, help="training samples of the teacher task")
    p.add_argument("--lr-points", type=int,
                   help="try only the central N points of each optimizer's 5-point lr grid (for short runs)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="runs in parallel, one thread each")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def config_from(args):
    config = preset_config(args.preset)
    if args.tasks:
        config.tasks = args.tasks
    datasets = {dataset for dataset, _ in config.tasks}
    for name in ("epochs", "seeds", "train_size", "lr_points"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.epochs:
        config.epochs = {d: args.epochs for d in datasets}
    if args.batch_sizes:
        config.batch_sizes = {d: args.batch_sizes for d in datasets}
    if args.variant_batch_sizes:
        config.variant_batch_sizes = {d: args.variant_batch_sizes for d in datasets}
    for name in ("optimizers", "variants", "variant_optimizers", "seeds", "train_size", "lr_points"):
        if getattr(args, name):
            setattr(config, name, getattr(args, name))
    missing = [d for d in datasets if d not in config.batch_sizes or d not in config.epochs]
    if missing:
        raise SystemExit(f"the preset has no batch sizes or epochs for {missing}: give --batch-sizes and --epochs")
    return config


def _fit_batches(config):
    """Drop batch sizes larger than a task's training set; returns the notes to print."""
    notes = []
    for dataset in {d for d, _ in config.tasks}:
        size = len(load_data(RunSpec(dataset, "mlp", "SGD", 0.1, 1, 1, 0, train_size=config.train_size)).x_train)
        kept = [b for b in config.batch_sizes[dataset] if b <= size]
        if kept != config.batch_sizes[dataset]:
            notes.append(f"{dataset}: batch sizes over its {size} training samples skipped")
        if not kept:
            raise SystemExit(f"no batch size fits the {size} training samples of {dataset}")
        config.batch_sizes = {**config.batch_sizes, dataset: kept}
    return notes


def run(args) -> int:
    config = config_from(args)
    for note in _fit_batches(config):
        print(note)
    os.makedirs(args.out, exist_ok=True)
    results = run_sweep(config, jobs=args.jobs, progress=not args.no_progress)
    text = table(results)
    with open(os.path.join(args.out, "results.txt"), "w") as f:
        f.write(text + "\n\ncolumns:\n" + legend() + "\n")
    write_json(os.path.join(args.out, "results.json"), dataclasses.asdict(config), results)
    plots = write_all(results, args.out)
    print(text)
    print("\ncolumns:\n" + legend())
    effect = batch_effect(results)
    if effect:
        print("\n" + effect)
    print(f"\nwrote {os.path.join(args.out, 'results.json')}, results.txt and plots:")
    for path in plots:
        print(f"  {path}")
    return 0


def main(argv=None) -> int:
    parser = build_parser("python -m cblr_ext.experiments",
                          "Large-batch study: SGD, LARS, MCLR and CBLR across batch sizes, with small-loss "
                          "discarding and batch-size scheduling (Gao & Zhong, arXiv 2012.08795).", "full")
    return run(parser.parse_args(argv))
