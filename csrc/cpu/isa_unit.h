// One instruction-set variant of the CPU passes and its kernel table.  The unit
// (isa_*.cpp) has included isa_prelude.h, opened its target region and named the
// variant's namespace CBLR_ISA.
#ifndef CBLR_ISA
#error "included by the isa_*.cpp units only (they name the variant)"
#endif

#include "parallel.h"
#include "stream.h"
#include "median.h"
#include "step_passes.h"
#include "protocol_passes.h"
#include "adam_passes.h"
#include "median_histogram.h"

#define CBLR_JOIN_(a, b) a##b
#define CBLR_JOIN(a, b) CBLR_JOIN_(a, b)
#define CBLR_NAME_(x) #x
#define CBLR_NAME(x) CBLR_NAME_(x)

namespace cblr {
namespace cpu {

const KernelTable* CBLR_JOIN(CBLR_ISA, _kernels)() {
  static const KernelTable table{CBLR_NAME(CBLR_ISA), &CBLR_ISA::reduce_layers, &CBLR_ISA::apply_layers,
                                 &CBLR_ISA::copy_layers, &CBLR_ISA::shift_layers,
                                 &CBLR_ISA::histogram_layers, &CBLR_ISA::grad_sq_layers,
                                 &CBLR_ISA::adam_reduce_layers, &CBLR_ISA::adam_apply_layers,
                                 &CBLR_ISA::adam_secant_apply_layers, &CBLR_ISA::gather_layers};
  return &table;
}

}  // namespace cpu
}  // namespace cblr
