"""The input checks that csrc/binding_checks.h gives both bindings: the same check, the
same message (but for the backend's name), before anything is written; through the CPU
binding here, through the CUDA one where a GPU and the CUDA extension are present."""
import pytest
import torch

from cblr_ext import ops

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(ops.LOAD_ERROR is not None, reason="the C++ extension is not built")),
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available() or ops.cuda_kernels() != "cuda",
                                                  reason="needs a CUDA GPU and the CUDA extension")),
]
WHO = {"cpu": "cblr_ext cpp backend: ", "cuda": "cblr_ext cuda backend: "}


def _cases(device):
    w = torch.ones(4, 3, device=device)
    saved = torch.full((4, 3), 2.0, device=device)
    return {
        "1 layers but 0 saved parameters": ([w], []),
        "saved parameter of layer 0 has dtype Half, expected Float": ([w], [saved.half()]),
        "saved parameter of layer 0 must have its parameter's shape and memory layout": ([w], [saved.t().contiguous()]),
        "layer 0 is not dense (a view with gaps or overlaps)": ([torch.ones(4, 6, device=device)[:, ::2]], [saved]),
        "layer 0 has dtype Int; supported are": ([w.int()], [saved.int()]),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(_cases("cpu")))
def test_restore_refuses_bad_input_before_writing(device, case):
    params, saved = _cases(device)[case]
    before = [p.clone() for p in params]
    with pytest.raises(RuntimeError) as info:
        ops.OPS.probe_restore_(params, saved)
    assert f"{WHO[device]}{case}" in str(info.value)
    assert all(torch.equal(p, b) for p, b in zip(params, before))


@pytest.mark.parametrize("device", DEVICES)
def test_update_counts_and_reduction_tables(device):
    w, g = torch.ones(3, device=device), torch.ones(3, device=device)
    kappa = torch.zeros((), dtype=torch.float64, device=device)
    age = torch.zeros((), device=device)
    sums = torch.zeros(1, 4, dtype=torch.float64, device=device)
    median = torch.zeros(1, device=device)
    flags = torch.zeros(1, 4, dtype=torch.bool, device=device)
    found_inf = torch.zeros((), dtype=torch.bool, device=device)

    def update(kappas=(kappa,), sums=sums, rule="lars"):
        return ops.OPS.layerwise_update_(rule, [w], [g], [], [], list(kappas), [age], [], [False], [], [True], sums,
                                         median, flags, found_inf, None, torch.tensor(0.1), 0.0, False, 0.0, 1e-8,
                                         1e-3, 0.0, None, 1e-3, 1, False, False,
                                         torch.empty(0, dtype=torch.uint8, device=device), None)

    with pytest.raises(RuntimeError, match=f"{WHO[device]}1 layers but 0 kappas"):
        update(kappas=())
    with pytest.raises(RuntimeError, match=rf"{WHO[device]}the reduction's sums must be a contiguous Double tensor "
                                           r"of shape \[1, 4\]"):
        update(sums=sums.float())
    with pytest.raises(RuntimeError, match=f"{WHO[device]}unknown rule 'sgd'"):
        update(rule="sgd")
    with pytest.raises(RuntimeError, match=f"{WHO[device]}kappa of layer 0 must be a contiguous Double tensor "
                                           "of 1 element"):
        update(kappas=(kappa.float(),))
    assert torch.equal(w, torch.ones(3, device=device))
    update()  # the same call with valid inputs runs
    assert not torch.equal(w, torch.ones(3, device=device))
