"""The sharded median's gathered candidates (ops ``median_candidates`` and
``median_candidate_histogram``): hand-derived keys, the C++ kernels against the reference
bit for bit, their counts against a full pass of ``median_histogram``, and which rounds
of the radix select read the candidates instead of w and g."""
from types import SimpleNamespace

import pytest
import torch

from cblr_ext import backends, ops
from cblr_ext import functional as F
from cblr_ext import layer_math as lm
from cblr_ext.distributed import _MedianSelect

needs_cpp = pytest.mark.skipif(backends.why_unavailable("cpp", "cpu") is not None,
                               reason="the C++ extension is not built")
OPS = {"reference": ops.REFERENCE_OPS, "cpp": ops.OPS}
BACKENDS = ["reference", pytest.param("cpp", marks=needs_cpp)]


def _bits(x: float) -> int:
    return torch.tensor(x, dtype=torch.float32).view(torch.int32).item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_candidates_by_hand(backend):
    # Quotients |g + 0.5 w| / |w|: 1.5, 1.25, none (w = 0), 0 (g = −0.5 w), 1.75, NaN (g = NaN),
    # then a second layer: 3.0, 1.5.  Keys under the prefix of 1.0's exponent (bits ≥ 23).
    w1, g1 = torch.tensor([1.0, 2.0, 0.0, 4.0, -2.0, 1.0]), torch.tensor([1.0, 1.5, 3.0, -2.0, 4.5, float("nan")])
    w2, g2 = torch.tensor([1.0, -2.0]), torch.tensor([2.5, -2.0])
    prefix = torch.tensor([_bits(1.0), _bits(1.0)], dtype=torch.int64)
    keys, per_layer = OPS[backend].median_candidates([w1, w2], [g1, g2], None, 0.5, prefix, 23)
    assert keys.dtype == torch.int32
    assert keys.tolist() == [_bits(1.5), _bits(1.25), _bits(1.75), _bits(1.5)]  # 3.0 has another exponent
    assert per_layer.tolist() == [3, 1]


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_cpp_matches_the_reference_and_a_full_pass(dtype):
    gen = torch.Generator().manual_seed(0)
    # Layers of 0, 1 and more elements than one chunk (65536) holds, zeros and a NaN among them.
    ws = [torch.randn(n, generator=gen).to(dtype) for n in (0, 1, 70001, 513)]
    gs = [torch.randn(n, generator=gen).to(dtype) * 1e-2 for n in (0, 1, 70001, 513)]
    ws[2][::7] = 0
    gs[3][5] = float("nan")
    scale = torch.tensor([4.0])
    # Round 0 of every layer picks its fullest bucket: the candidates are the keys inside it.
    first, _ = ops.REFERENCE_OPS.median_histogram(ws, gs, scale, 1e-3, torch.zeros(4, dtype=torch.int64), 20, 11)
    prefix = first.argmax(1) << 20
    got = ops.OPS.median_candidates(ws, gs, scale, 1e-3, prefix, 20)
    want = ops.REFERENCE_OPS.median_candidates(ws, gs, scale, 1e-3, prefix, 20)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert got[1].tolist() == first.gather(1, first.argmax(1)[:, None])[:, 0].long().tolist()
    for shift, width in ((10, 10), (0, 10)):  # the exact median's later rounds, each narrowing the prefix
        full, _ = ops.REFERENCE_OPS.median_histogram(ws, gs, scale, 1e-3, prefix, shift, width)
        for name in ("reference", "cpp"):
            counts = OPS[name].median_candidate_histogram(got[0], got[1], prefix, shift, width)
            assert torch.equal(counts, full), (name, shift)
        prefix = prefix | (full.argmax(1) << shift)


def _select(w, g, approx):
    flags = torch.zeros((1, F.FLAG_COLUMNS), dtype=torch.bool)
    flags[0, F.FLAG_MEASURED] = True
    reduction = F.Reduction(torch.zeros((1, F.SUM_COLUMNS), dtype=torch.float64), torch.zeros(1), flags)
    group = SimpleNamespace(sharding=SimpleNamespace(owns=[True]), local_params=[w], local_grads=[g],
                            hp=SimpleNamespace(approx_median=approx, weight_decay=0.0),
                            backend=backends.get("reference", "cpu"))
    select = _MedianSelect(group, reduction)
    for r in range(len(select.schedule)):
        select.choose(r, select.histogram(r))
    select.write(reduction)
    return select, reduction.median[0]


@pytest.mark.parametrize("approx", [False, True])
def test_the_rounds_after_the_gather_read_the_candidates(approx):
    gen = torch.Generator().manual_seed(1)
    w, g = torch.randn(20001, generator=gen), torch.randn(20001, generator=gen)
    select, median = _select(w, g, approx)
    assert median.view(torch.int32) == lm.lower_median(g.abs() / w.abs(), approx=approx).view(torch.int32)
    if approx:  # its second round is its last: a full pass, nothing gathered
        assert select.keys is None
    else:  # the bucket of round 0 keeps a few per cent of the 20001 quotients
        assert 0 < select.keys.numel() < 20001 / 8
        assert select.key_counts.tolist() == [select.keys.numel()]


def test_ties_past_the_share_are_counted_from_w_and_g():
    # Two quotient values, 1 and 2: round 0's bucket keeps half the quotients, more than 1/8.
    w = torch.ones(1001)
    g = torch.where(torch.arange(1001) % 2 == 0, 1.0, 2.0)
    select, median = _select(w, g, approx=False)
    assert select.keys is None
    assert median == 1.0  # 501 ones, 500 twos: the 501st smallest


@needs_cpp
def test_candidate_histogram_checks_its_input():
    keys = torch.tensor([_bits(1.5)], dtype=torch.int32)
    prefix = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="candidates"):
        ops.OPS.median_candidate_histogram(keys, torch.tensor([1, 1]), prefix, 0, 10)
    with pytest.raises(RuntimeError, match="int32"):
        ops.OPS.median_candidate_histogram(keys.long(), torch.tensor([1, 0]), prefix, 0, 10)
    with pytest.raises(RuntimeError, match="bits"):
        ops.OPS.median_candidate_histogram(keys, torch.tensor([1, 0]), prefix, 24, 11)
    with pytest.raises(RuntimeError, match="0 to 31"):
        ops.OPS.median_candidates([torch.ones(1)], [torch.ones(1)], None, 0.0, prefix[:1], 32)
