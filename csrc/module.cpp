// Python entry point of memkd._C: importing it runs the TORCH_LIBRARY registrations of the op
// schemas (and of the CUDA kernels when built with them). It is compiled for any x86-64, because
// it also reports which of the CPU kernel builds (memkd._cpu_<variant>) this processor can run.
#include <Python.h>

// Build facts (torch version, CUDA kernels, CPU kernel builds) that memkd/ops/_library.py reads
// from the file's bytes before importing it.
extern "C" __attribute__((used, visibility("default"))) const char memkd_build_info[] =
    "MEMKD_BUILD_INFO{" MEMKD_BUILD_INFO "}";

namespace {

// The CPU kernel builds this processor can run, best first: the checks match what
// -march=x86-64-v4 and -march=x86-64-v3 let the compiler use (the rarer v3 features F16C, LZCNT
// and MOVBE come with every processor that has BMI2 and FMA). __builtin_cpu_supports also checks
// that the operating system saves the wider registers.
PyObject* runnable_cpu_variants(PyObject*, PyObject*) {
#if defined(__x86_64__)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
                      __builtin_cpu_supports("avx512vl");
  if (avx512) return Py_BuildValue("(sss)", "avx512", "avx2", "baseline");
  if (avx2) return Py_BuildValue("(ss)", "avx2", "baseline");
#endif
  return Py_BuildValue("(s)", "baseline");
}

PyMethodDef methods[] = {
    {"runnable_cpu_variants", runnable_cpu_variants, METH_NOARGS,
     "The CPU kernel builds (memkd._cpu_<variant>) this processor can run, best first."},
    {nullptr, nullptr, 0, nullptr}};

struct PyModuleDef memkd_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&memkd_module); }
