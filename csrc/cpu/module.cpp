// Python module shell for the posteriors_fast::* CPU kernels.
//
// Importing posteriors_fast._C loads this shared library; the static
// TORCH_LIBRARY_IMPL blocks in the other files then register their kernels
// against the schemas that posteriors_fast/_library.py defined. No Python API
// is exported: everything is reached through torch.ops.posteriors_fast.
#include <Python.h>

static struct PyModuleDef posteriors_fast_c_module = {
    PyModuleDef_HEAD_INIT, "_C",
    "C++ CPU kernels of posteriors_fast (registered with torch.library)", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&posteriors_fast_c_module); }
