// Python entry point of memkd._C: importing it runs the TORCH_LIBRARY registrations.
#include <Python.h>

// Build facts (torch version, CUDA kernels) that memkd/ops/_library.py reads from the file's bytes
// before importing it.
extern "C" __attribute__((used, visibility("default"))) const char memkd_build_info[] =
    "MEMKD_BUILD_INFO{" MEMKD_BUILD_INFO "}";

static struct PyModuleDef memkd_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&memkd_module); }
