"""The C++ passes' instruction-set variants (csrc/cpu/dispatch.h).

Every variant this CPU runs steps like the reference (each in its own process,
chosen with CBLR_EXT_CPU_ISA); the default is the widest one the CPU supports
(as torch's own CPU-capability detection sees it); an unusable choice is a clear
error; and no code outside a variant's namespace uses that variant's instructions
(a shared inline function compiled for AVX-512 could otherwise be the copy the
linker keeps, and crash an AVX2 machine).
"""
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from cblr_ext.backends import cpp

TESTS = Path(__file__).resolve().parent
VARIANTS = ("baseline", "avx2", "avx512")

# Parity with the reference in a fresh process for one variant (helpers of test_cpp_backend).
PARITY = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from test_cpp_backend import RULES, max_rel_diff, train
    from cblr_ext.backends import cpp
    assert cpp.kernel_isa() == {isa!r}, cpp.kernel_isa()
    for rule, extra in [("lars", {{}}), ("lars", {{"lag": 1}}), ("mclr", {{}}), ("mclr", {{"lag": 1}}), ("cblr", {{}})]:
        for dtype_kw in ({{}}, {{"nesterov": True}}):
            kw = dict(lr=0.1, momentum=0.9, weight_decay=1e-3, **extra, **dtype_kw)
            ref, _ = train(RULES[rule], "reference", steps=8, **kw)
            got, _ = train(RULES[rule], "cpp", steps=8, **kw)
            assert max_rel_diff(ref, got) <= 1e-5, (rule, extra, dtype_kw, max_rel_diff(ref, got))
    print("ok")
""")


def run_with_isa(isa, script):
    env = dict(os.environ, CBLR_EXT_CPU_ISA=isa)
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)


def cpu_runs(isa):
    """Whether this CPU runs the variant, as torch's capability detection sees it."""
    capability = torch.backends.cpu.get_cpu_capability()
    return {"baseline": True, "avx2": capability in ("AVX2", "AVX512"), "avx512": capability == "AVX512"}[isa]


@pytest.mark.parametrize("isa", VARIANTS)
def test_variant_steps_like_the_reference(isa):
    if not cpu_runs(isa):
        pytest.skip(f"this CPU does not run {isa} (torch sees {torch.backends.cpu.get_cpu_capability()})")
    result = run_with_isa(isa, PARITY.format(tests=str(TESTS), isa=isa))
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_default_is_the_widest_supported_variant():
    widest = [isa for isa in VARIANTS if cpu_runs(isa)][-1]
    assert cpp.kernel_isa() == widest


def test_unknown_variant_is_a_clear_error():
    script = "from cblr_ext.backends import cpp; cpp.kernel_isa()"
    result = run_with_isa("sse9", script)
    assert result.returncode != 0
    assert "CBLR_EXT_CPU_ISA=sse9 is not compiled in or not supported by this CPU" in result.stderr


def _extension_path():
    from cblr_ext import _build
    if _build.load() != "setup.py":
        pytest.skip("the extension was JIT-built; its library path is torch's cache")
    import cblr_ext._C
    return cblr_ext._C.__file__


# VEX/EVEX-encoded instructions and the BMI ones, which a baseline x86-64 CPU lacks
# (tzcnt is not listed: it decodes as bsf there, and gcc emits it for any target).
WIDE = re.compile(r"\t(v[a-z0-9]+|shlx|shrx|sarx|andn|pdep|pext|bzhi|blsr|blsi|blsmsk|rorx|mulx)\s")


def _disassembly():
    """(function, instruction line) for every instruction of the built extension."""
    listing = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", _extension_path()],
                             capture_output=True, text=True, check=True).stdout
    function = None
    for line in listing.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            function = header.group(1)
        elif function:
            yield function, line


needs_objdump = pytest.mark.skipif(shutil.which("objdump") is None, reason="needs binutils' objdump")
x86_64_only = pytest.mark.skipif(not sys.platform.startswith("linux") or os.uname().machine != "x86_64",
                                 reason="the variants exist on x86-64 only")


@needs_objdump
@x86_64_only
def test_wide_instructions_stay_in_their_variant():
    leaks, variants_seen = set(), set()
    for function, line in _disassembly():
        if WIDE.search(line):
            if "cblr::cpu::avx2::" in function or "cblr::cpu::avx512::" in function:
                variants_seen.add("avx512" if "avx512::" in function else "avx2")
            else:
                leaks.add(function)
    assert variants_seen == {"avx2", "avx512"}  # the check sees the variants' code at all
    assert not leaks, sorted(leaks)[:5]


# A packed fp32 square root or division on a 256- or 512-bit register.
PACKED_SQRT_DIV = re.compile(r"\t(vsqrtps|vdivps)\s+.*%[yz]mm")


# Where each Adam pass's element loop is inlined: pass 1 in its chunk function, pass 2 (the
# update of adam_update_ and adam_secant_update_) in the layer loop both share.
ADAM_PASS_SYMBOLS = {"pass 1": "adam_reduce_chunk", "pass 2": "adam_move_layers"}


@needs_objdump
@x86_64_only
def test_adam_passes_vectorise_in_the_wide_variants():
    # u = m̂/(√v̂ + ε) + λw: with errno-setting sqrtf (no -fno-math-errno) gcc leaves these
    # loops scalar (sqrtss, divss), several times slower than the bytes they move.
    seen = set()
    for function, line in _disassembly():
        found = PACKED_SQRT_DIV.search(line)
        if not found:
            continue
        for isa in ("avx2", "avx512"):
            for pass_name, symbol in ADAM_PASS_SYMBOLS.items():
                if f"cblr::cpu::{isa}::" in function and symbol in function:
                    seen.add((isa, pass_name, found.group(1)))
    wanted = {(isa, pass_name, op) for isa in ("avx2", "avx512") for pass_name in ADAM_PASS_SYMBOLS
              for op in ("vsqrtps", "vdivps")}
    assert seen == wanted, sorted(wanted - seen)
