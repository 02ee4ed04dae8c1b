// mops_kernels._C: the table of contents of the compiled ops, one m.def per op.
// Each op's glue (argument checks, device guard, stream, dtype dispatch) lives in its own file.
#include <torch/extension.h>

#include "ops.h"

namespace {

// int4_matmul_cpu(x, qweight, scale, min, group_size, bits) as a plain CPython function (METH_FASTCALL):
// the one-token decode GEMV is ~3 us, and pybind11's dispatcher (overload resolution, type casters)
// cost ~0.1 us of that (ad hoc: the public op 2.98 -> 2.88 us on 192x576); this parses the six
// arguments itself. Any argument it cannot take (not a
// tensor, min neither a tensor nor None, not an int) and every check of the kernel raises
// RuntimeError, which mops_kernels.ops.int4_matmul's fast path answers by taking the checked path.
PyObject* int4_matmul_cpu_fast(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  try {
    if (nargs != 6 || !THPVariable_Check(args[0]) || !THPVariable_Check(args[1]) || !THPVariable_Check(args[2]) ||
        !(args[3] == Py_None || THPVariable_Check(args[3])) || !PyLong_CheckExact(args[4]) || !PyLong_CheckExact(args[5]))
      throw std::runtime_error(
          "int4_matmul_cpu_fast(x, qweight, scale, min or None, group_size, bits): tensors and ints expected");
    const long long group_size = PyLong_AsLongLong(args[4]), bits = PyLong_AsLongLong(args[5]);
    if (PyErr_Occurred()) {  // an int past 64 bits
      PyErr_Clear();
      throw std::runtime_error("int4_matmul_cpu_fast: group_size and bits must fit in 64 bits");
    }
    const c10::optional<at::Tensor> mn =
        args[3] == Py_None ? c10::optional<at::Tensor>() : c10::optional<at::Tensor>(THPVariable_Unpack(args[3]));
    at::Tensor y = mops::int4_matmul_cpu(THPVariable_Unpack(args[0]), THPVariable_Unpack(args[1]),
                                         THPVariable_Unpack(args[2]), mn, group_size, bits);
    return THPVariable_Wrap(std::move(y));
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

PyMethodDef kFastMethods[] = {
    {"int4_matmul_cpu_fast", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(int4_matmul_cpu_fast)),
     METH_FASTCALL, "int4_matmul_cpu without pybind11's dispatcher (the op's CPU fast path)"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mops_kernels compiled kernels (C++ CPU, and CUDA when built with it)";
#ifdef WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
  // The error path every argument check takes (a c10::Error thrown here, RuntimeError in Python).
  // setup.py calls it right after a build: a toolchain that links its own C++ runtime into the
  // extension crashes the process here instead (seen on the GPU image: /opt/gcc/bin/g++).
  m.def("_raise_check", [] { TORCH_CHECK(false, "mops_kernels._C: the C++ error path works"); },
        "raises RuntimeError through TORCH_CHECK (build and install checks)");
  // ---- CPU ---------------------------------------------------------------------------------
  m.def("int4_matmul_cpu", &mops::int4_matmul_cpu, "y = x @ W^T, W block-quantized (4/8-bit), CPU");
  PyModule_AddFunctions(m.ptr(), kFastMethods);
  m.def("int4_matmul_cpu_pre", &mops::int4_matmul_cpu_pre,
        "int4_matmul_cpu of x (pre=0), RMSNorm(x) (pre=1) or silu(x[:, :K]) * x[:, K:] (pre=2), plus residual, "
        "reading the next weight ahead; decode step, CPU",
        py::arg("x"), py::arg("qweight"), py::arg("scale"), py::arg("min"), py::arg("group_size"), py::arg("bits"),
        py::arg("pre"), py::arg("norm_weight"), py::arg("eps"), py::arg("residual") = py::none(),
        py::arg("next_qweight") = py::none(), py::arg("next_scale") = py::none(), py::arg("next_min") = py::none());
  m.def("int4_matmul_backward_cpu", &mops::int4_matmul_backward_cpu, "dx = dy @ W, W block-quantized, CPU");
  m.def("prefix_attention_cpu", &mops::prefix_attention_cpu,
        "gated prefix attention, decode (T = 1), pool read through the index, CPU");
  m.def("decode_attention_cpu", &mops::decode_attention_cpu,
        "the CPU decode step's rotary embedding + KV-cache write + prefix attention of one layer, one call");
  m.def("prefix_attention_cuda_emulate", &mops::prefix_attention_cuda_emulate,
        "the CUDA decode kernel's decomposition run on the host (tests): same args + num_sms");
  m.def("prefix_attention_cuda_plan", &mops::prefix_attention_cuda_plan,
        "the CUDA decode kernel's launch plan (grids, splits) for (B, Hq, Hkv, S, D, elt, has_prefix, num_sms)");
  m.def("cpu_isa", &mops::isa::request, py::arg("want") = "",
        "the CPU kernels' instruction set: '' reads it, 'auto' (CPUID), 'base' or 'avx2' (refused "
        "without AVX2/FMA/F16C) set it; returns the active one");
  m.def("_pretend_cpu", &mops::isa::pretend_cpu, py::arg("has_avx2"),
        "tests only: CPUID answers as a CPU with (1) or without (0) AVX2/FMA/F16C; -1 the real one");
  // ---- CUDA --------------------------------------------------------------------------------
#ifdef WITH_CUDA
  m.def("prefix_attention_cuda", &mops::prefix_attention_cuda,
        "gated prefix attention, decode (T = 1): split-K over S + prefix split, then a merge");
  m.def("int4_matmul_cuda", &mops::int4_matmul_cuda, "y = x @ W^T, W block-quantized (4/8-bit), decode GEMV",
        py::arg("x"), py::arg("qweight"), py::arg("scale"), py::arg("min"), py::arg("group_size"), py::arg("bits"),
        py::arg("ksplit") = 1);
#endif
}
