// mmfuse._C: how this mmfuse was built, for Python (mmfuse.build_info()). Only pybind11: no torch
// header, no torch symbol, so it loads beside any torch; the ops live in the separate op library
// (csrc/ops.cpp, mmfuse/_ops.abi3.so), which Python never imports as a module.
#include <pybind11/pybind11.h>

#ifndef MMFUSE_CUDA_ARCHS
#define MMFUSE_CUDA_ARCHS ""
#endif
#ifndef MMFUSE_TORCH_HEADERS
#define MMFUSE_TORCH_HEADERS ""
#endif
#ifndef MMFUSE_TORCH_TARGET
#define MMFUSE_TORCH_TARGET ""
#endif

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
#ifdef MMFUSE_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  info["cuda_archs"] = MMFUSE_CUDA_ARCHS;
  info["torch_built_against"] = MMFUSE_TORCH_HEADERS;  // the torch whose headers compiled the ops
  info["torch_target"] = MMFUSE_TORCH_TARGET;          // the oldest torch the ops library loads in
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "mmfuse build information (the ops are registered under torch.ops.mmfuse by the op library)";
  m.def("build_info", &build_info, "whether CUDA kernels were built, for which archs, against which torch");
}
