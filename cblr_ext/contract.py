"""The op contract, a leaf module (it imports nothing of cblr_ext): every op's schema,
the columns of what the ops return, and the dtypes of the state they read and write.
``ops`` declares the ops from it, the backends implement it, ``functional`` calls it.

| op | reads | writes | returns |
| --- | --- | --- | --- |
| ``layerwise_reduce`` | w, g ÷ grad scale (probe: g at w + s, s) | the workspace | ``Reduction`` tensors (sums, median, flags) |
| ``layerwise_update_`` | w (or the probe's saved w_t), g ÷ grad scale, a reduction | w, v, s_{t−1}, κ̄, age, lag stash | [L, 7] statistics |
| ``probe_shift_`` | w, s_{t−1} | saved ← w, w ← w + s, Δ ← (w + s) − w as stored | Σw_t² per layer (fp64) |
| ``probe_restore_`` | saved | w ← saved | |
| ``cpu_isa`` | | | the C++ kernels' instruction set |
| ``grad_sq_sums`` | g ÷ grad scale | | Σg² per layer (fp64; LAMB's global clipping) |
| ``adam_reduce`` | w, g ÷ grad scale ÷ clip, m, v, step count | | ``Reduction`` tensors of the direction u (Σw², Σu², median of abs(u_i)/abs(w_i), non-finite flags) |
| ``median_histogram`` | w, g ÷ grad scale, each layer's key prefix | | one radix-select round's counts per layer, and its NaN quotients (the sharded median) |
| ``median_candidates`` | w, g ÷ grad scale, each layer's key prefix | | the keys under the prefixes, layer after layer, and their number per layer (the sharded median's later rounds count these) |
| ``median_candidate_histogram`` | those keys, each layer's key prefix | | a round's counts per layer of the keys under the prefixes |
| ``adam_update_`` | w, g ÷ grad scale ÷ clip, m, v, step count, a reduction | w, m, v, step count; nothing when ``found_inf`` | [L, 7] statistics (``g_norm``: ‖u‖) |
| ``adam_secant_sums`` | g and the probe's g at w + s (÷ grad scale ÷ clip), s, v, step count | | [L, 2] fp64: Σ((g − g_s)/(√v̂ + ε))², Σs² (CBLR on the Adam direction) |
| ``adam_secant_update_`` | w, g ÷ grad scale ÷ clip, m, v, step count, each layer's α | w, m, v, step count, s ← α·u; nothing when ``found_inf`` | [L] fp64 ‖α·u‖ |
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

SCHEMAS = {
    "layerwise_reduce": (
        "layerwise_reduce(str rule, Tensor[] params, Tensor[] grads, Tensor[] ages, bool[] adapt, "
        "bool[] lagged_valid, Tensor?[] probe_grads, Tensor?[] probe_steps, Tensor? w_sq, bool[] w_sq_known, "
        "Tensor? grad_scale, float weight_decay, int curvature_interval, bool lag, bool approx_median, bool check_nonfinite, "
        "Tensor(a!) workspace) -> (Tensor sums, Tensor median, Tensor flags)"),
    "layerwise_update_": (
        "layerwise_update_(str rule, Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
        "Tensor(c!)[] prev_steps, Tensor(d!)[] kappas, Tensor(e!)[] ages, Tensor(f!)[] lagged, "
        "bool[] lagged_valid, Tensor?[] saved, bool[] adapt, Tensor sums, Tensor median, Tensor flags, "
        "Tensor found_inf, Tensor? grad_scale, Tensor lr, float momentum, bool nesterov, float weight_decay, float eps, "
        "float trust_coefficient, float curvature_ema, float? max_ratio, float fallback_trust, "
        "int curvature_interval, bool lag, bool approx_median, Tensor(g!) workspace, "
        "Tensor(h!)? next_w_sq) -> Tensor"),
    "probe_shift_": ("probe_shift_(Tensor(a!)[] params, Tensor[] steps, Tensor(b!)[] saved, "
                     "Tensor(c!)[] displacements) -> Tensor"),
    "probe_restore_": "probe_restore_(Tensor(a!)[] params, Tensor[] saved) -> ()",
    "cpu_isa": "cpu_isa() -> str",
    # The Adam base (LAMB and the median rule on the Adam direction u): pass 1 forms m, v and
    # u in registers and writes nothing; pass 2 writes w, m, v and the step count.
    "grad_sq_sums": "grad_sq_sums(Tensor[] grads, Tensor? grad_scale) -> Tensor",
    "adam_reduce": (
        "adam_reduce(str rule, Tensor[] params, Tensor[] grads, Tensor[] exp_avgs, Tensor[] exp_avg_sqs, "
        "Tensor[] steps, Tensor? grad_scale, Tensor? clip, float beta1, float beta2, float eps, float weight_decay, "
        "bool bias_correction) -> (Tensor sums, Tensor median, Tensor flags)"),
    "adam_update_": (
        "adam_update_(str rule, Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
        "Tensor(d!)[] steps, bool[] adapt, Tensor sums, Tensor median, Tensor flags, Tensor found_inf, "
        "Tensor? grad_scale, Tensor? clip, Tensor lr, float beta1, float beta2, float eps, float weight_decay, "
        "bool bias_correction, float trust_coefficient, float? max_ratio) -> Tensor"),
    # CBLR on the Adam direction: the secant of the preconditioned gradient, Σ(P·(g − g_s))² and Σs².
    "adam_secant_sums": (
        "adam_secant_sums(Tensor[] params, Tensor[] grads, Tensor[] probe_grads, Tensor[] probe_steps, "
        "Tensor[] exp_avg_sqs, Tensor[] steps, Tensor? grad_scale, Tensor? clip, float beta2, float eps, "
        "bool bias_correction) -> Tensor"),
    # Its pass 2: w ← w − α·u with each layer's α = γ·r (the ratio formed from the secant by
    # layer_math.layer_ratio), and the step s = α·u kept for the next probe.
    "adam_secant_update_": (
        "adam_secant_update_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
        "Tensor(d!)[] steps, Tensor(e!)[] prev_steps, Tensor alpha, Tensor found_inf, Tensor? grad_scale, "
        "Tensor? clip, float beta1, float beta2, float eps, float weight_decay, bool bias_correction) -> Tensor"),
    # The sharded median's radix select (cblr_ext/distributed.py): one round's counts of every layer of a group.
    "median_histogram": ("median_histogram(Tensor[] params, Tensor[] grads, Tensor? grad_scale, float weight_decay, "
                         "Tensor prefix, int shift, int width) -> (Tensor counts, Tensor nans)"),
    "median_candidates": ("median_candidates(Tensor[] params, Tensor[] grads, Tensor? grad_scale, float weight_decay, "
                          "Tensor prefix, int top) -> (Tensor keys, Tensor layer_counts)"),
    "median_candidate_histogram": ("median_candidate_histogram(Tensor keys, Tensor layer_counts, Tensor prefix, "
                                   "int shift, int width) -> Tensor"),
}
# The ops of a step: every backend implements these (``cpu_isa`` is the C++ extension's).
STEP_OPS = ("layerwise_reduce", "layerwise_update_", "probe_shift_", "probe_restore_")
# The Adam base's ops: the reference implements them (the default kernel on every device).
ADAM_OPS = ("grad_sq_sums", "adam_reduce", "adam_update_")
# CBLR on the Adam direction's ops: the reference implements them (the default kernel on every device);
# the C++ CPU kernels both; Triton adam_secant_sums only; CUDA neither (the reference runs there).
ADAM_PROBE_OPS = ("adam_secant_sums", "adam_secant_update_")
# Sharded groups' ops: the reference and the C++ CPU kernel (csrc/binding.cpp).
SHARDED_OPS = ("median_histogram", "median_candidates", "median_candidate_histogram")

# Columns of Reduction.sums (fp64): Σw², Σg² of the step's inputs (the Adam base: Σu² of
# its direction u in the SUM_G2 column); the CBLR secant's Σ(d(w_t) − d(w_t + s))² and Σs².
# 0 where not taken (see the flags).
SUM_W2, SUM_G2, SUM_DIFF2, SUM_STEP2 = range(4)
SUM_COLUMNS = 4
# Columns of Reduction.flags (bool): the layer measures κ this step; Σw², Σg² were taken
# (else the update takes them); the median was taken (MCLR); g holds a NaN or Inf.
FLAG_MEASURED, FLAG_NORMS, FLAG_MEDIAN, FLAG_NONFINITE = range(4)
FLAG_COLUMNS = 4

# The per-layer scalars' dtype: κ̄ and the lag stash in the state, the statistics
# (layer_math: fp64 so that no norm or curvature of finite fp32 input overflows).
SCALAR_DTYPE = torch.float64
# Columns of the per-layer statistics ([L, 7], SCALAR_DTYPE) returned by ``layerwise_update_``.
STAT_NAMES = ("w_norm", "g_norm", "step_norm", "kappa", "ratio", "alpha", "fallback")
STAT_COLUMNS = len(STAT_NAMES)


def state_dtype(param: Tensor) -> torch.dtype:
    """Math and optimizer state run in fp32 at least (fp64 stays fp64)."""
    return torch.promote_types(param.dtype, torch.float32)


@dataclass
class Reduction:
    """Pass 1 of one group: ``sums`` [L, 4] fp64, ``median`` [L] fp32 (the lower median of
    the quotients |d_i|/|w_i|, bf16-truncated for median="approx"; NaN when the layer has
    no quotient or a NaN one; 0 where not taken), ``flags`` [L, 4] bool."""

    sums: Tensor
    median: Tensor
    flags: Tensor

    @property
    def nonfinite(self) -> Tensor:
        return self.flags[:, FLAG_NONFINITE]

    @property
    def measured(self) -> Tensor:
        return self.flags[:, FLAG_MEASURED]

    def tensors(self) -> tuple:
        return self.sums, self.median, self.flags


def host_flags(values: list, device) -> Tensor:
    """Host bools as an [L] bool tensor made by fills, not copied from host memory (no
    host-to-device copy: a CUDA graph can capture it)."""
    return torch.stack([torch.full((), bool(v), dtype=torch.bool, device=device) for v in values])
