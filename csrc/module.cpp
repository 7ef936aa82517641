// Python entry point of fastdd._C. The kernels register themselves with the dispatcher
// (TORCH_LIBRARY_FRAGMENT(fastdd_C, ...) in csrc/cpu/*.cpp and csrc/cuda/*.cu) when this
// library is loaded, as torch.ops.fastdd_C.<name>: the "cpp" / "cuda" implementations that the
// CPU / CUDA kernels of the fastdd:: ops run (fastdd/ops/_backend.py, OP_BACKENDS).
#include <Python.h>

#ifndef FASTDD_WITH_CUDA
#define FASTDD_WITH_CUDA 0
#endif

static struct PyModuleDef fastdd_c_module = {
    PyModuleDef_HEAD_INIT, "_C",
    "fastdd compiled kernels; the ops live in torch.ops.fastdd_C", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&fastdd_c_module);
  if (module != nullptr) PyModule_AddIntConstant(module, "WITH_CUDA", FASTDD_WITH_CUDA);
  return module;
}
