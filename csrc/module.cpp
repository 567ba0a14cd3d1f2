// Python entry point of sdsx._C. Importing the module loads this library, whose static
// TORCH_LIBRARY / TORCH_LIBRARY_IMPL registrars put the ops under torch.ops.sdsx.*; the module
// itself exposes only build facts.
#include <Python.h>

namespace {

PyObject* build_info(PyObject*, PyObject*) {
  PyObject* d = PyDict_New();
  if (!d) return nullptr;
#ifdef SDSX_WITH_CUDA
  PyDict_SetItemString(d, "cuda", Py_True);
#else
  PyDict_SetItemString(d, "cuda", Py_False);
#endif
#ifdef SDSX_WITH_OPENMP
  PyDict_SetItemString(d, "openmp", Py_True);
#else
  PyDict_SetItemString(d, "openmp", Py_False);
#endif
  return d;
}

PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS, "Compile-time facts: {'cuda': bool, 'openmp': bool}."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "sdsx native ops (torch.ops.sdsx)", -1, methods,
                          nullptr, nullptr, nullptr, nullptr};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
