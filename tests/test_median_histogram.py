"""The op ``median_histogram`` (one round of the sharded median's radix select): hand-derived
counts, the C++ kernel against the reference bit for bit over dtypes, GradScaler's unscaling
and the rounds' prefixes, and its input checks."""
import pytest
import torch

from cblr_ext import backends, ops

needs_cpp = pytest.mark.skipif(backends.why_unavailable("cpp", "cpu") is not None,
                               reason="the C++ extension is not built")
OPS = {"reference": ops.REFERENCE_OPS, "cpp": ops.OPS}
BACKENDS = ["reference", pytest.param("cpp", marks=needs_cpp)]


def _bits(x: float) -> int:
    return torch.tensor(x, dtype=torch.float32).view(torch.int32).item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_counts_by_hand(backend):
    # Quotients |g + 0.5 w| / |w|: 1.5, 0.75, none (w = 0), 0 (g = −0.5 w), 2.5, +inf (g = inf).
    w = torch.tensor([1.0, 2.0, 0.0, 4.0, -2.0, 1.0])
    g = torch.tensor([1.0, 0.5, 3.0, -2.0, 6.0, float("inf")])
    q = [1.5, 0.75, None, 0.0, 2.5, float("inf")]
    counts, nans = OPS[backend].median_histogram([w], [g], None, 0.5, torch.zeros(1, dtype=torch.int64), 20, 11)
    want = torch.zeros(1, 2048, dtype=torch.float64)
    for x in q:
        if x is not None:
            want[0, _bits(x) >> 20] += 1
    assert torch.equal(counts, want)
    assert nans.tolist() == [0.0]
    # Round 2 inside 1.5's bucket of round 1: only 1.5 is counted, by its low 10 bits.
    prefix = torch.tensor([_bits(1.5) & ~0x3FF])
    counts, _ = OPS[backend].median_histogram([w], [g], None, 0.5, prefix, 0, 10)
    assert counts.sum() == 1 and counts[0, _bits(1.5) & 0x3FF] == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_quotients_are_counted_apart(backend):
    w = torch.tensor([1.0, 0.0, 2.0])
    g = torch.tensor([float("nan"), float("nan"), 1.0])
    counts, nans = OPS[backend].median_histogram([w], [g], None, 0.0, torch.zeros(1, dtype=torch.int64), 20, 11)
    assert nans.tolist() == [1.0]  # the excluded w = 0 is not a NaN quotient
    assert counts.sum() == 1 and counts[0, _bits(0.5) >> 20] == 1


def _layers(dtype, gen):
    sizes = (3, 1000, 70001, 200000)  # below and above one work chunk (65536)
    ws = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    gs = [(torch.randn(n, generator=gen) * 1e-2).to(dtype) for n in sizes]
    ws[2][::7] = 0
    gs[3][5] = float("nan")
    return ws, gs


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scaled", [False, True])
def test_cpp_is_the_reference_bit_for_bit(dtype, scaled):
    gen = torch.Generator().manual_seed(0)
    ws, gs = _layers(dtype, gen)
    grad_scale = torch.tensor([1024.0]) if scaled else None
    # Prefixes from a real quotient of each layer, so that every round counts some keys.
    prefix = torch.tensor([_bits(float(abs(g[1].float() / w[1].float()))) for w, g in zip(ws, gs)])
    for shift, width in ((20, 11), (10, 10), (0, 10), (16, 4)):
        args = (ws, gs, grad_scale, 1e-3, prefix, shift, width)
        got, want = ops.OPS.median_histogram(*args), ops.REFERENCE_OPS.median_histogram(*args)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (shift, width)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scale_reads_unscaled_gradients(backend):
    gen = torch.Generator().manual_seed(1)
    w, g = torch.randn(500, generator=gen), torch.randn(500, generator=gen)
    scale = torch.tensor([65536.0])
    first = OPS[backend].median_histogram([w], [g * 65536.0], scale, 0.0, torch.zeros(1, dtype=torch.int64), 20, 11)
    plain = OPS[backend].median_histogram([w], [g], None, 0.0, torch.zeros(1, dtype=torch.int64), 20, 11)
    assert torch.equal(first[0], plain[0])  # g·S·fl32(1/S) = g exactly for a power of two


@needs_cpp
def test_bad_input_is_refused():
    w, g = torch.ones(4), torch.ones(4)
    with pytest.raises(RuntimeError, match="key bits"):
        ops.OPS.median_histogram([w], [g], None, 0.0, torch.zeros(1, dtype=torch.int64), 24, 11)
    with pytest.raises(RuntimeError, match="prefixes"):
        ops.OPS.median_histogram([w], [g], None, 0.0, torch.zeros(2, dtype=torch.int64), 20, 11)
    with pytest.raises(RuntimeError, match="gradient of layer 0"):
        ops.OPS.median_histogram([w], [torch.ones(5)], None, 0.0, torch.zeros(1, dtype=torch.int64), 20, 11)
