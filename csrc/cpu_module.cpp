// Python entry point of one build of the CPU kernels, memkd._cpu_<variant> (MEMKD_CPU_MODULE):
// importing it runs the TORCH_LIBRARY_IMPL(memkd, CPU) registrations in csrc/cpu/. CMake compiles
// these sources once per instruction-set level; memkd/ops/_library.py imports exactly one.
#include <Python.h>

#define MEMKD_STRINGIFY2(x) #x
#define MEMKD_STRINGIFY(x) MEMKD_STRINGIFY2(x)
#define MEMKD_CONCAT2(a, b) a##b
#define MEMKD_CONCAT(a, b) MEMKD_CONCAT2(a, b)

extern "C" __attribute__((used, visibility("default"))) const char memkd_build_info[] =
    "MEMKD_BUILD_INFO{" MEMKD_BUILD_INFO "}";

static struct PyModuleDef memkd_cpu_module = {PyModuleDef_HEAD_INIT, MEMKD_STRINGIFY(MEMKD_CPU_MODULE), nullptr,
                                              -1, nullptr};

PyMODINIT_FUNC MEMKD_CONCAT(PyInit_, MEMKD_CPU_MODULE)(void) { return PyModule_Create(&memkd_cpu_module); }
