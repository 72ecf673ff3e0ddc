// Everything the CPU passes include, for the instruction-set units (isa_*.cpp) to
// include *before* their target region: library and shared inline code then has one
// baseline definition in every unit (a variant's copy could otherwise be the one the
// linker keeps, and run on a CPU without that instruction set).
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(__SSE2__)
#include <immintrin.h>  // declares every x86 intrinsic; a unit's target region enables its own
#endif

#include "dispatch.h"
#include "kernels.h"
#include "layers.h"
