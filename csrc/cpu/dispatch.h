// The CPU passes are compiled once per instruction set (isa_*.cpp: the same code for
// any CPU, for AVX2 and for AVX-512); dispatch.cpp runs the best variant this CPU
// supports, chosen at first use (or the one named by CBLR_EXT_CPU_ISA).
#pragma once

#include "kernels.h"

namespace cblr {
namespace cpu {

struct KernelTable {
  const char* isa;
  decltype(&cpu::reduce_layers) reduce;
  decltype(&cpu::apply_layers) apply;
  decltype(&cpu::copy_layers) copy;
  decltype(&cpu::shift_layers) shift;
  decltype(&cpu::histogram_layers) histogram;
  decltype(&cpu::grad_sq_layers) grad_sq;
  decltype(&cpu::adam_reduce_layers) adam_reduce;
  decltype(&cpu::adam_apply_layers) adam_apply;
  decltype(&cpu::adam_secant_apply_layers) adam_secant_apply;
  decltype(&cpu::gather_layers) gather;
};

// Null where the variant is not compiled in (not x86-64, or not GCC).
const KernelTable* baseline_kernels();
const KernelTable* avx2_kernels();
const KernelTable* avx512_kernels();

}  // namespace cpu
}  // namespace cblr
