"""MNIST-1D as a built-in task: generated (never downloaded), cached, a validation split
carved from the training set, and a clear error without the package (a dependency of
cblr_ext, so no test here skips without it)."""
import sys

import pytest
import torch

from cblr_ext.experiments import cli, data


def test_splits_come_from_the_generator_and_validation_from_train(tmp_path):
    splits = data.mnist1d(num_samples=1000, val_size=100, cache_dir=str(tmp_path))
    x, y, x_test, y_test = data._generate_mnist1d(1000, 0)
    # mnist1d's own split: the first 80% train, the rest test; we only carve validation from train
    assert len(x) == 800 and len(x_test) == 200
    assert splits.input_shape == (40,) and splits.classes == 10
    assert (len(splits.x_train), len(splits.x_val)) == (700, 100)
    assert torch.equal(splits.x_test, x_test) and torch.equal(splits.y_test, y_test)
    together = torch.cat([splits.x_train, splits.x_val])
    assert torch.equal(together[together[:, 0].argsort()], x[x[:, 0].argsort()])


def test_cached_tensors_are_reused(tmp_path, monkeypatch):
    first = data.mnist1d(num_samples=500, val_size=50, cache_dir=str(tmp_path))
    assert len(list(tmp_path.iterdir())) == 1
    monkeypatch.setattr(data, "_generate_mnist1d", lambda *a: pytest.fail("regenerated despite the cache"))
    again = data.mnist1d(num_samples=500, val_size=50, cache_dir=str(tmp_path))
    assert torch.equal(first.x_train, again.x_train) and torch.equal(first.y_val, again.y_val)


def test_missing_package_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mnist1d", None)   # import mnist1d now raises ImportError
    monkeypatch.setitem(sys.modules, "mnist1d.data", None)
    with pytest.raises(ImportError, match=r"pip install mnist1d"):
        data.mnist1d(cache_dir=str(tmp_path))


def test_cli_accepts_the_task():
    assert cli._task("mnist1d/mlp") == ("mnist1d", "mlp")


def test_digits_without_scikit_learn_names_the_study_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r'pip install --no-build-isolation -e "\.\[study\]"'):
        data.digits()
