// The CPU passes for x86-64 CPUs with AVX2 and FMA (x86-64-v3).
#include "isa_prelude.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,bmi,bmi2,popcnt,f16c")
#define CBLR_ISA avx2
#include "isa_unit.h"
#pragma GCC pop_options
#else
const cblr::cpu::KernelTable* cblr::cpu::avx2_kernels() { return nullptr; }
#endif
