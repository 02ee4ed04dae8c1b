// Declarations of the glue functions that bindings.cpp exposes (torch types only here).
#pragma once
#include <torch/extension.h>

namespace mops {

// ---- CPU ------------------------------------------------------------------------------------

#ifdef WITH_CUDA
// ---- CUDA -----------------------------------------------------------------------------------
#endif

}  // namespace mops
