"""Sweeps of the same configuration over different optimizers, merged into one: each
configuration's lr is chosen from its own runs alone, so adding an optimizer's sweep to a
recorded one gives what one sweep over all of them would (wall times aside)."""
from __future__ import annotations

import json
import os
from typing import List, Tuple

from .report import machine
from .sweep import SweepConfig


def read_results(folder: str) -> dict:
    path = os.path.join(folder, "results.json")
    if not os.path.isfile(path):
        raise ValueError(f"{folder!r} holds no results.json")
    with open(path) as f:
        return json.load(f)


def _cell(result) -> tuple:
    return result["dataset"], result["model"], result["optimizer"], result["variant"], result["batch_size"]


def merge_documents(documents: List[dict]) -> Tuple[dict, list]:
    """The merged config (its optimizers the parts' in order) and results (in the order of one
    sweep over that config).  Refused unless every part ran on this machine (wall times and the
    plots' machine line stay true), with the same config but for its optimizers, and no
    configuration is in two parts."""
    if len(documents) < 2:
        raise ValueError(f"merging needs at least two results, got {len(documents)}")
    here = machine()
    for document in documents:
        if document["machine"] != here:
            raise ValueError(f"a part ran on {document['machine']}, not on this machine ({here}): "
                             "its wall times would not compare")
    first = {k: v for k, v in documents[0]["config"].items() if k != "optimizers"}
    for document in documents[1:]:
        rest = {k: v for k, v in document["config"].items() if k != "optimizers"}
        differ = sorted(k for k in first.keys() | rest.keys() if first.get(k) != rest.get(k))
        if differ:
            raise ValueError(f"the parts' configs differ in {differ}: only their optimizers may")
    by_cell = {}
    for document in documents:
        for result in document["results"]:
            if _cell(result) in by_cell:
                raise ValueError(f"configuration {_cell(result)} is in two of the parts")
            by_cell[_cell(result)] = result
    config = {**documents[0]["config"],
              "optimizers": list(dict.fromkeys(o for d in documents for o in d["config"]["optimizers"]))}
    cells = list(SweepConfig(**config).cells())
    missing = [cell for cell in cells if cell not in by_cell]
    if missing:
        raise ValueError(f"no part holds configurations {missing}")
    return config, [by_cell[cell] for cell in cells]
