// The CPU passes for x86-64 CPUs with AVX-512 F/BW/DQ/VL (x86-64-v4).
#include "isa_prelude.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,bmi,bmi2,popcnt,f16c")
#define CBLR_ISA avx512
#define CBLR_ISA_AVX512 1  // g++ does not define __AVX512F__ in a target region
#include "isa_unit.h"
#pragma GCC pop_options
#else
const cblr::cpu::KernelTable* cblr::cpu::avx512_kernels() { return nullptr; }
#endif
