"""csrc/layer_math.h against its specification cblr_ext/layer_math.py.

A tiny C++ program built against the header evaluates each function on hand-picked
inputs (every fallback included); the results must be bit-identical to the Python
functions on fp32 (and fp64) tensors.  The header must also compile as CUDA.
"""
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from cblr_ext import layer_math as lm

CSRC = Path(__file__).resolve().parent.parent / "csrc"
NAN, INF = float("nan"), float("inf")

# Reads "<function> <args...>" lines (hex floats), prints the results as hex floats.
PROBE = r"""
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include "layer_math.h"
using namespace cblr;
int main() {
  char line[4096];
  while (std::fgets(line, sizeof line, stdin)) {
    const char* fn = std::strtok(line, " \n");
    double a[16];
    int n = 0;
    while (n < 16) {
      const char* tok = std::strtok(nullptr, " \n");
      if (!tok) break;
      a[n++] = std::strtod(tok, nullptr);
    }
    if (!std::strcmp(fn, "lars_kappa")) {
      std::printf("%a\n", lars_kappa(a[0], a[1], a[2], a[3]));
    } else if (!std::strcmp(fn, "median_kappa")) {
      std::printf("%a\n", median_kappa(float(a[0]), a[1]));
    } else if (!std::strcmp(fn, "secant_kappa")) {
      std::printf("%a\n", secant_kappa(a[0], a[1], a[2]));
    } else if (!std::strcmp(fn, "norm_from_sum")) {
      std::printf("%a\n", norm_from_sum(a[0]));
    } else if (!std::strcmp(fn, "reduction_kappa")) {
      std::printf("%a\n", reduction_kappa(Rule(int(a[0])), a[1], a[2], a[3], a[4], float(a[5]), a[6], a[7]));
    } else if (!std::strcmp(fn, "decayed_grad_f32")) {
      std::printf("%a\n", decayed_grad(float(a[0]), float(a[1]), float(a[2])));
    } else if (!std::strcmp(fn, "decayed_grad_f64")) {
      std::printf("%a\n", decayed_grad(a[0], a[1], a[2]));
    } else if (!std::strcmp(fn, "curvature_quotient")) {
      std::printf("%a\n", curvature_quotient(float(a[0]), float(a[1])));
    } else if (!std::strcmp(fn, "approx_median")) {
      std::printf("%a\n", approx_median(float(a[0])));
    } else if (!std::strcmp(fn, "fallback_ratio")) {
      std::printf("%a\n", fallback_ratio(a[0], a[1], a[2], a[3], a[4]));
    } else if (!std::strcmp(fn, "layer_ratio")) {
      RatioParams p = make_ratio_params(a[6], a[7], a[8] != 0, a[9], a[10], a[11], a[12]);
      LayerRatio r = layer_ratio(a[0], a[1] != 0, a[2], a[3], a[4], a[5] != 0, p);
      std::printf("%a %a %a %d\n", r.ratio, r.new_bar, r.used, int(r.fallback));
    } else if (!std::strcmp(fn, "layer_alpha")) {
      std::printf("%a\n", layer_alpha(a[0], float(a[1])));
    } else if (!std::strcmp(fn, "square_in_double_f32")) {
      std::printf("%a\n", square_in_double(float(a[0])));
    } else if (!std::strcmp(fn, "measurement_due")) {
      std::printf("%d\n", int(measurement_due(float(a[0]), (long long)a[1])));
    } else if (!std::strcmp(fn, "next_age")) {
      std::printf("%a\n", next_age(float(a[0]), a[1] != 0));
    } else if (!std::strcmp(fn, "adam_moments_f32")) {
      AdamMoments<float> r = adam_moments(float(a[0]), float(a[1]), float(a[2]), float(a[3]), float(1.0 - a[3]),
                                          float(a[4]), float(1.0 - a[4]));
      std::printf("%a %a\n", r.m, r.v);
    } else if (!std::strcmp(fn, "adam_moments_f64")) {
      AdamMoments<double> r = adam_moments(a[0], a[1], a[2], a[3], 1.0 - a[3], a[4], 1.0 - a[4]);
      std::printf("%a %a\n", r.m, r.v);
    } else if (!std::strcmp(fn, "bias_corrections")) {
      BiasCorrections r = bias_corrections(float(a[0]), float(a[1]), float(a[2]), a[3] != 0);
      std::printf("%a %a\n", r.first, r.second);
    } else if (!std::strcmp(fn, "adam_direction_f32")) {
      std::printf("%a\n", adam_direction(float(a[0]), float(a[1]), float(a[2]), float(a[3]), float(a[4]),
                                          float(a[5]), float(a[6])));
    } else if (!std::strcmp(fn, "adam_direction_f64")) {
      std::printf("%a\n", adam_direction(a[0], a[1], a[2], a[3], a[4], a[5], a[6]));
    } else if (!std::strcmp(fn, "adam_secant_difference_f32")) {
      std::printf("%a\n", adam_secant_difference(float(a[0]), float(a[1]), float(a[2]), float(a[3]), float(a[4])));
    } else if (!std::strcmp(fn, "adam_secant_difference_f64")) {
      std::printf("%a\n", adam_secant_difference(a[0], a[1], a[2], a[3], a[4]));
    } else if (!std::strcmp(fn, "adam_ratio")) {
      AdamRatio r = adam_ratio(Rule(int(a[0])), a[1], a[2], float(a[3]), a[4] != 0, a[5], a[6], a[7] != 0, a[8]);
      std::printf("%a %a %d\n", r.ratio, r.kappa, int(r.fallback));
    } else if (!std::strcmp(fn, "momentum_update")) {
      float w = float(a[0]), v = float(a[2]);
      float s = momentum_update(w, float(a[1]), v, float(a[3]), float(a[4]), a[5] != 0, a[6] != 0);
      std::printf("%a %a %a\n", w, v, s);
    }
  }
}
"""


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    tmp = tmp_path_factory.mktemp("probe")
    src, exe = tmp / "probe.cpp", tmp / "probe"
    src.write_text(PROBE)
    # The extension's flags: -fPIC and -O3 are where a gcc 12.2 miscompile once showed.
    subprocess.run([cxx, "-std=c++17", "-O3", "-fPIC", "-ffp-contract=off", f"-I{CSRC}", str(src), "-o", str(exe)],
                   check=True)

    def run(calls):
        text = "".join(f"{fn} {' '.join(float(x).hex() for x in args)}\n" for fn, args in calls)
        out = subprocess.run([str(exe)], input=text, capture_output=True, text=True, check=True).stdout
        return [[float.fromhex(x) if ("0x" in x or x in ("nan", "-nan", "inf", "-inf")) else float(x)
                 for x in line.split()] for line in out.splitlines()]
    return run


def f32(x):
    return torch.tensor(x, dtype=torch.float32)


def f64(x):
    return torch.tensor(x, dtype=torch.float64)


def same(a, b):
    """Bit-level equality of two values as doubles (any NaN equals any NaN): fp32 results
    print exactly as doubles, so this is bit equality for them too."""
    a, b = float(a), float(b)
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return f64(a).view(torch.int64).item() == f64(b).view(torch.int64).item()


def check(probe, fn, cases, expected):
    got = probe([(fn, args) for args in cases])
    for args, row, want in zip(cases, got, expected):
        want = want if isinstance(want, (list, tuple)) else [want]
        assert all(same(g, w) for g, w in zip(row, want)), f"{fn}{tuple(args)}: C++ {row} != Python {want}"


def test_scalar_rules(probe):
    lars = [(2.0, 3.0, 1e-4, 1e-8), (0.0, 1.0, 0.0, 0.0), (1e-30, 1e30, 0.1, 1e-8), (3.5, 0.0, 5e-4, 1e-8)]
    check(probe, "lars_kappa", lars, [lm.lars_kappa(f64(w), f64(g), wd, e) for w, g, wd, e in lars])
    med = [(0.5, 1e-8), (0.0, 1e-8), (NAN, 1e-8), (INF, 1e-8), (1e-40, 0.0)]
    check(probe, "median_kappa", med, [lm.median_kappa(f32(m), e) for m, e in med])
    sec = [(0.3, 0.7, 1e-8), (0.0, 0.7, 1e-8), (0.3, 0.0, 1e-8), (NAN, NAN, 1e-8), (1e-20, 1e20, 0.0),
           (1e200, 1e-200, 0.0)]
    check(probe, "secant_kappa", sec, [lm.secant_kappa(f64(d), f64(s), e) for d, s, e in sec])
    fb = [(2.0, 3.0, 1e-4, 1e-8, 1e-3), (0.0, 3.0, 0.0, 1e-8, 1e-3), (2.0, 0.0, 0.0, 0.0, 1e-3),
          (INF, 1.0, 0.0, 1e-8, 1e-3), (1e-30, 1e30, 0.0, 0.0, 1e-3), (2.0, NAN, 0.0, 1e-8, 1e-3),
          (8.0, 8e38, 0.0, 1e-8, 1e-3)]  # ‖g‖ beyond fp32: r = 1e-41, not the undefined case
    check(probe, "fallback_ratio", fb, [lm.fallback_ratio(f64(w), f64(g), wd, e, t) for w, g, wd, e, t in fb])
    alpha = [(1e-41, 10.0), (0.37, 0.1), (1.0, 3.0e38), (NAN, 1.0)]
    check(probe, "layer_alpha", alpha, [lm.layer_alpha(f64(r), f32(lr)) for r, lr in alpha])
    squares = [3.0, 1e20, 1e-30, 3.4e38, 1e-45, 0.0, INF]  # exact in fp64; fp32 would overflow or underflow
    check(probe, "square_in_double_f32", [(x,) for x in squares],
          [f32(x).double().square() for x in squares])


RULE_IDS = {"lars": 0, "mclr": 1, "cblr": 2}  # cblr::Rule


def test_reduction_to_kappa(probe):
    """Σx² (fp64) to norms (fp64), and κ by rule from a reduction's quantities."""
    # Sums whose square root rounds differently via fp32, huge, subnormal and non-finite ones.
    sums = [4.0, 2.0, 1e-300, 1e300, 3.4e38**2 * 4, 5e-324, 0.0, INF, NAN, 0.1 + 2**-50]
    check(probe, "norm_from_sum", [(x,) for x in sums], [lm.norm_from_sum(f64(x)) for x in sums])
    cases = [
        # w_norm, g_norm, Σ(Δd)², Σs², median, weight_decay, eps
        (2.0, 3.0, 0.09, 0.49, 0.5, 1e-4, 1e-8),
        (0.0, 1.0, 0.0, 0.49, 0.0, 0.0, 0.0),
        (3.5, 0.0, 0.09, 0.0, NAN, 5e-4, 1e-8),
        (NAN, NAN, 1e-300, 1e300, INF, 0.0, 1e-8),
        (1e-30, 1e30, 2.0, 3.0, 1e-40, 0.1, 1e-8),
    ]
    for rule, rule_id in RULE_IDS.items():
        expected = [lm.reduction_kappa(rule, f64(w), f64(g), f64(d2), f64(s2), f32(m), wd, e)
                    for w, g, d2, s2, m, wd, e in cases]
        check(probe, "reduction_kappa", [(rule_id,) + c for c in cases], expected)


def test_elementwise_math(probe):
    # Values where a fused multiply-add would round differently from g + fl(β·w).
    dg = [(0.1, 0.3, 1e-4), (1.0000001, -3.3333333, 0.3), (-2.5, 7.1, 5e-4), (0.0, -0.0, 0.0)]
    check(probe, "decayed_grad_f32", dg, [lm.decayed_grad(f32(g), f32(w), wd) for g, w, wd in dg])
    for (g, w, wd), row in zip(dg, probe([("decayed_grad_f64", a) for a in dg])):
        f64 = torch.tensor([g, w], dtype=torch.float64)
        assert row[0] == lm.decayed_grad(f64[0], f64[1], wd).item()
    quot = [(0.3, -0.7), (-1e-30, 1e30), (INF, 2.0), (NAN, 1.0), (0.0, 5.0), (-0.0, 5.0), (-0.0, -2.0)]
    check(probe, "curvature_quotient", quot,
          [lm.curvature_quotients(f32([d]), f32([w]))[0] for d, w in quot])
    values = [0.953771710395813, 1.0, 3.0e38, 1e-40, 0.0, INF, NAN, 12345.678]
    check(probe, "approx_median", [(v,) for v in values],
          [lm.lower_median(f32([v]), approx=True) for v in values])


LAYER_RATIO_CASES = [
    # kappa, measured, kappa_bar, w_norm, g_norm, adapt, tc, ema, has_max, max, wd, eps, ft
    (2.0, 1, NAN, 3.0, 4.0, 1, 1e-3, 0.0, 0, 0, 1e-4, 1e-8, 1e-3),     # first measurement
    (2.0, 1, 4.0, 3.0, 4.0, 1, 1.0, 0.5, 0, 0, 0.0, 1e-8, 1e-3),       # EMA
    (2.0, 1, 4.0, 3.0, 4.0, 1, 1.0, 0.9, 1, 0.3, 0.0, 1e-8, 1e-3),     # clipped by max_ratio
    (NAN, 1, 4.0, 3.0, 4.0, 1, 1.0, 0.5, 0, 0, 0.0, 1e-8, 1e-3),       # measured, undefined: fallback
    (0.0, 1, NAN, 3.0, 4.0, 1, 1.0, 0.5, 0, 0, 0.0, 1e-8, 1e-3),       # κ = 0: fallback
    (INF, 1, NAN, 3.0, 4.0, 1, 1.0, 0.5, 0, 0, 0.0, 1e-8, 1e-3),       # κ = inf: fallback
    (7.0, 0, 4.0, 3.0, 4.0, 1, 1.0, 0.5, 0, 0, 0.0, 1e-8, 1e-3),       # between measurements: reuse κ̄
    (7.0, 0, NAN, 3.0, 4.0, 1, 1.0, 0.5, 0, 0, 0.0, 1e-8, 1e-3),       # nothing measured yet: fallback
    (2.0, 1, NAN, 3.0, 4.0, 0, 1.0, 0.5, 0, 0, 0.0, 1e-8, 1e-3),       # not adapted: r = 1
    (1e-45, 1, NAN, 3.0, 4.0, 1, 1.0, 0.0, 0, 0, 0.0, 1e-8, 1e-3),     # η/κ̄ = inf: fallback
    (NAN, 1, NAN, 0.0, 4.0, 1, 1.0, 0.0, 0, 0, 0.0, 1e-8, 1e-3),       # fallback undefined (‖w‖ = 0): 1
    (NAN, 1, NAN, 3.0, 0.0, 1, 1.0, 0.0, 0, 0, 0.0, 0.0, 1e-3),        # fallback undefined (‖g‖ = 0): 1
    (NAN, 1, NAN, 3.0, 4.0, 1, 1.0, 0.0, 1, 1e-5, 1e-4, 1e-8, 2e-3),   # fallback, clipped
]


def test_layer_ratio(probe):
    expected = []
    for kappa, measured, bar, w, g, adapt, tc, ema, has_max, mx, wd, eps, ft in LAYER_RATIO_CASES:
        r, new_bar, used, fallback = lm.layer_ratio(
            f64(kappa), torch.tensor(bool(measured)), f64(bar), f64(w), f64(g), torch.tensor(bool(adapt)),
            trust_coefficient=tc, curvature_ema=ema, max_ratio=mx if has_max else None, weight_decay=wd,
            eps=eps, fallback_trust=ft)
        expected.append([r, new_bar, used, float(fallback)])
    check(probe, "layer_ratio", LAYER_RATIO_CASES, expected)


def test_cadence(probe):
    due = [(INF, 1), (1.0, 1), (1.0, 3), (2.0, 3), (3.0, 3)]
    check(probe, "measurement_due", due, [float(lm.measurement_due(f32(a), k)) for a, k in due])
    ages = [(INF, 0), (INF, 1), (2.0, 0), (2.0, 1)]
    check(probe, "next_age", ages, [lm.next_age(f32(a), torch.tensor(bool(m))) for a, m in ages])


@pytest.mark.parametrize("has_momentum,nesterov", [(False, False), (True, False), (True, True)])
def test_momentum_update(probe, has_momentum, nesterov):
    cases = [(0.3, 0.7, 0.11, 0.05, 0.9), (-1.0000001, 3.3333333, -0.2, 1e-3, 0.99), (1e-30, 1e30, 0.0, 0.1, 0.5)]
    expected = []
    for w, d, v, alpha, mu in cases:
        wt, vt = f32([w]), f32([v]) if has_momentum else None
        s = lm.momentum_update(wt, f32([d]), vt, f32(alpha), mu, nesterov)
        expected.append([wt[0], vt[0] if has_momentum else f32(v), s[0]])
    check(probe, "momentum_update", [c + (float(has_momentum), float(nesterov)) for c in cases], expected)


def test_adam_moments_and_bias_corrections(probe):
    """m, v rounded op by op in the math type (fp32 and fp64), 1 − β^t in fp32."""
    moments = [(0.3, 0.11, 0.02, 0.9, 0.999), (-1.0000001, 3.3333333, 1e-3, 0.95, 0.98), (1e-20, 0.0, 0.0, 0.0, 0.5),
               (1e19, -2.5, 7.0, 0.9, 0.999)]  # g² overflows fp32: v = inf, as torch's
    for suffix, make in (("f32", f32), ("f64", f64)):
        expected = [list(lm.adam_moments(make([g]), make([m]), make([v]), b1, b2)) for g, m, v, b1, b2 in moments]
        check(probe, f"adam_moments_{suffix}", moments, [[x[0], y[0]] for x, y in expected])
    steps = [(0.0, 0.9, 0.999, 1), (9.0, 0.9, 0.999, 1), (99999.0, 0.9, 0.999, 1), (4.0, 0.0, 0.5, 1),
             (4.0, 0.9, 0.999, 0)]
    check(probe, "bias_corrections", steps,
          [list(lm.bias_corrections(f32(s), b1, b2, bool(bc))) for s, b1, b2, bc in steps])


def test_adam_direction(probe):
    cases = [  # m, v, w, bc1, bc2, eps, weight_decay
        (0.05, 2.5e-4, 0.7, 0.1, 1e-3, 1e-6, 0.01), (-0.3, 0.09, -1.3, 0.271, 0.003, 1e-8, 0.0),
        (0.0, 0.0, 2.0, 1.0, 1.0, 1e-6, 0.1), (0.0, 0.0, 2.0, 1.0, 1.0, 0.0, 0.1),  # 0/0: NaN, as torch's
        (1e-30, 3.0, 1e30, 0.5, 0.7, 1e-6, 1e-4), (0.1, 0.2, 0.3, 0.4, 0.5, 1e-6, 0.6)]
    # One-element tensors: torch takes its scalar loop, whose square root is correctly
    # rounded as the header's (its fp32 vector loop's is not, to an ulp: tests/test_lamb.py).
    for suffix, make in (("f32", f32), ("f64", f64)):
        check(probe, f"adam_direction_{suffix}", cases,
              [lm.adam_direction(make([m]), make([v]), make([w]), make(c1), make(c2), e, wd)[0]
               for m, v, w, c1, c2, e, wd in cases])


def test_adam_secant_difference(probe):
    cases = [  # g, g_s, v, bc2, eps
        (0.3, 0.1, 2.5e-4, 1e-3, 1e-6), (-1.7, 2.9, 0.09, 0.003, 1e-8), (0.5, 0.5, 0.3, 0.7, 1e-6),
        (1e-30, -3e-30, 0.0, 1.0, 1e-6), (0.0, 0.0, 0.0, 1.0, 0.0),  # 0/0: NaN, as torch's
        (2.0, -1.0, 0.0, 1.0, 0.0), (0.1, 0.2, 0.3, 0.4, 0.5)]  # v = 0, ε = 0: ±inf
    for suffix, make in (("f32", f32), ("f64", f64)):
        check(probe, f"adam_secant_difference_{suffix}", cases,
              [lm.adam_secant_difference(make([g]), make([g_s]), make([v]), make([c2]), e)[0]
               for g, g_s, v, c2, e in cases])


def test_adam_ratio(probe):
    cases = [  # rule, ‖w‖, ‖u‖, median, adapt, η, ε, has max, max
        (0, 3.0, 4.0, 0.0, 1, 1.0, 1e-6, 0, 0.0), (0, 3.0, 4.0, 0.0, 1, 1.0, 1e-6, 1, 0.5),
        (0, 0.0, 4.0, 0.0, 1, 1.0, 1e-6, 0, 0.0), (0, 3.0, 0.0, 0.0, 1, 1.0, 1e-6, 0, 0.0),
        (0, 3.0, 4.0, 0.0, 0, 1.0, 1e-6, 0, 0.0), (0, INF, 4.0, 0.0, 1, 1.0, 1e-6, 0, 0.0),
        (0, 1e-300, 1e300, 0.0, 1, 1.0, 1e-6, 0, 0.0), (0, NAN, 4.0, 0.0, 1, 1.0, 1e-6, 0, 0.0),
        (1, 3.0, 4.0, 0.25, 1, 0.02, 1e-6, 0, 0.0), (1, 3.0, 4.0, 0.25, 1, 0.02, 1e-6, 1, 0.01),
        (1, 3.0, 4.0, 0.0, 1, 0.02, 1e-6, 0, 0.0), (1, 3.0, 4.0, NAN, 1, 0.02, 1e-6, 0, 0.0),
        (1, 0.0, 4.0, 0.25, 1, 0.02, 1e-6, 0, 0.0), (1, 3.0, 4.0, 1e-45, 1, 1.0, 0.0, 0, 0.0)]
    rules = {0: "lars", 1: "mclr"}
    expected = []
    for rule, w, u, med, adapt, tc, eps, has_max, mx in cases:
        r, kappa, fallback = lm.adam_ratio(rules[rule], f64(w), f64(u), f32(med), torch.tensor(bool(adapt)),
                                           trust_coefficient=tc, eps=eps, max_ratio=mx if has_max else None)
        expected.append([r, kappa, float(fallback)])
    check(probe, "adam_ratio", cases, expected)


def test_header_compiles_as_cuda(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    src = tmp_path / "layer_math_check.cu"
    src.write_text(
        '#include "layer_math.h"\n'
        "__global__ void use_every_function(float* out, const float* in) {\n"
        "  float x = in[threadIdx.x], w = x, v = 0.f;\n"
        "  cblr::RatioParams p = cblr::make_ratio_params(1.0, 0.5, true, 10.0, 1e-4, 1e-8, 1e-3);\n"
        "  cblr::LayerRatio r = cblr::layer_ratio(x, true, cblr::quiet_nan_double(), 1.0, 2.0, true, p);\n"
        "  float s = cblr::momentum_update(w, cblr::decayed_grad(x, w, 1e-4f), v, 0.1f, 0.9f, true, true);\n"
        "  out[threadIdx.x] = r.ratio + r.used + cblr::approx_median(x) + cblr::median_kappa(x, 1e-8f)\n"
        "      + cblr::lars_kappa(1.f, x, 0.f, 0.f) + cblr::secant_kappa(x, 2.f, 0.f)\n"
        "      + cblr::fallback_ratio(x, 1.f, 0.f, 0.f, 1e-3f) + cblr::curvature_quotient(x, 2.f) + s\n"
        "      + cblr::next_age(x, cblr::measurement_due(x, 2)) + cblr::norm_from_sum(cblr::square_in_double(x))\n"
        "      + cblr::layer_alpha(r.ratio, x)\n"
        "      + cblr::reduction_kappa(cblr::RULE_CBLR, 1.f, x, 2.0, double(x), x, 0.f, 1e-8f)\n"
        "      + cblr::adam_moments(x, w, v, 0.9f, 0.1f, 0.999f, 0.001f).v\n"
        "      + cblr::adam_direction(x, w, v, cblr::bias_corrections(x, 0.9f, 0.999f, true).first, 0.5f, 1e-6f, 0.f)\n"
        "      + cblr::adam_ratio(cblr::RULE_LARS, 1.0, double(x), x, true, 1.0, 1e-6, false, 0.0).ratio\n"
        "      + cblr::adam_secant_difference(x, w, v, 0.5f, 1e-6f);\n"
        "}\n")
    subprocess.run([nvcc, "-x", "cu", "-c", "--fmad=false", f"-I{CSRC}", str(src), "-o", str(tmp_path / "k.o")],
                   check=True)
