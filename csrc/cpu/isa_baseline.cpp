// The CPU passes for any CPU (the compiler's default target).
#include "isa_prelude.h"

#define CBLR_ISA baseline
#include "isa_unit.h"
