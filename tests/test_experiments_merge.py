"""``--merge``: sweeps over different optimizers, merged, equal one sweep over all of them
(wall times aside); parts that do not fit together are refused before anything is written."""
import json

import pytest

from cblr_ext.experiments import cli

TINY = ["--preset", "adam", "--tasks", "teacher/mlp", "--train-size", "512", "--batch-sizes", "128", "256",
        "--epochs", "1", "--seeds", "2", "--lr-points", "2", "--jobs", "1", "--no-progress"]


def _sweep(folder, *optimizers, extra=()):
    assert cli.main([*TINY, *extra, "--optimizers", *optimizers, "--out", str(folder)]) == 0
    return folder


def _without_wall_times(document):
    for result in document["results"]:
        del result["wall_s"]
        for point in result["curve"]:
            del point["wall_s"]
    return document


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    return {"adamw": _sweep(root / "adamw", "AdamW"), "cblr": _sweep(root / "cblr", "LAMB-cblr"),
            "both": _sweep(root / "both", "AdamW", "LAMB-cblr")}


def _read(folder):
    return json.loads((folder / "results.json").read_text())


def test_merged_sweeps_equal_one_sweep_over_both(parts, tmp_path):
    out = tmp_path / "merged"
    assert cli.main(["--merge", str(parts["adamw"]), str(parts["cblr"]), "--out", str(out)]) == 0
    merged, whole = _read(out), _read(parts["both"])
    assert merged["config"]["optimizers"] == ["AdamW", "LAMB-cblr"]
    # each configuration's lr comes from its own runs, which do not depend on the others'
    assert _without_wall_times(merged) == _without_wall_times(whole)
    rows = (out / "results.txt").read_text().splitlines()[2:6]
    assert [(row.split()[1], row.split()[2]) for row in rows] == [
        ("128", "AdamW"), ("128", "LAMB-cblr"), ("256", "AdamW"), ("256", "LAMB-cblr")]
    assert (out / "accuracy_vs_batch.png").stat().st_size > 1000


def _refused(tmp_path, folders, message):
    out = tmp_path / "refused"
    with pytest.raises(SystemExit, match=message):
        cli.main(["--merge", *map(str, folders), "--out", str(out)])
    assert not out.exists()


def test_parts_of_different_configs_are_refused(parts, tmp_path):
    other = _sweep(tmp_path / "three-seeds", "LAMB", extra=["--seeds", "3"])
    _refused(tmp_path, [parts["adamw"], other], r"differ in \['seeds'\]")


def test_a_configuration_in_two_parts_is_refused(parts, tmp_path):
    _refused(tmp_path, [parts["adamw"], parts["both"]], "in two of the parts")


def test_a_part_from_another_machine_is_refused(parts, tmp_path):
    moved = tmp_path / "moved"
    moved.mkdir()
    document = _read(parts["cblr"])
    document["machine"]["cores"] += 1
    (moved / "results.json").write_text(json.dumps(document))
    _refused(tmp_path, [parts["adamw"], moved], "not on this machine")


def test_merge_takes_no_sweep_option_and_needs_two_parts(parts, tmp_path):
    _refused(tmp_path, [parts["adamw"], parts["cblr"], "--seeds", "2"], "drop --seeds")
    _refused(tmp_path, [parts["adamw"]], "at least two")
    _refused(tmp_path, [parts["adamw"], tmp_path / "nowhere"], "holds no results.json")
