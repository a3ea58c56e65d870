// Python module shell for the posteriors_fast::* CPU kernels.
//
// Importing posteriors_fast._C loads this shared library; the static
// TORCH_LIBRARY_IMPL blocks in the other files then register their kernels
// against the schemas that posteriors_fast/_library.py defined. The ops are
// reached through torch.ops.posteriors_fast; the module itself exports only
// the instruction-set level the kernels run at (multiversion.h):
//   cpu_isa() -> str                 the active level: "avx512", "avx2" or "baseline"
//   set_cpu_isa(name) -> str         cap the level at `name` ("auto": no cap); returns the
//                                    previous cap ("auto" if none), which set_cpu_isa
//                                    restores; ValueError above what the CPU has
//   supported_cpu_isas() -> tuple    the levels this CPU can run, best first
//   _simulate_cpu_isa(name) -> str   tests: pretend the CPU has at most `name`
//                                    ("auto": the real CPU); returns the previous one
//                                    ("auto" if it was the real CPU)
#include <Python.h>

#include <string>

#include "multiversion.h"

namespace pf = posteriors_fast;

namespace {

bool parse_arg(PyObject* arg, pf::Isa* level, bool* no_cap) {
  const char* text = PyUnicode_Check(arg) ? PyUnicode_AsUTF8(arg) : nullptr;
  if (text == nullptr) {
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "the ISA level must be a str");
    return false;
  }
  if (!pf::parse_isa(text, level, no_cap)) {
    PyErr_Format(PyExc_ValueError, "unknown CPU ISA level '%s': expected one of avx512, avx2, baseline, auto", text);
    return false;
  }
  return true;
}

PyObject* cpu_isa(PyObject*, PyObject*) { return PyUnicode_FromString(pf::isa_name(pf::active_isa())); }

PyObject* set_cpu_isa(PyObject*, PyObject* arg) {
  pf::Isa level, previous;
  bool no_cap, previous_no_cap;
  if (!parse_arg(arg, &level, &no_cap)) return nullptr;
  if (!pf::set_isa_cap(level, no_cap, &previous, &previous_no_cap)) {
    PyErr_Format(PyExc_ValueError, "CPU ISA level '%s' is not available: this CPU supports up to '%s'",
                 pf::isa_name(level), pf::isa_name(pf::supported_isa()));
    return nullptr;
  }
  return PyUnicode_FromString(previous_no_cap ? "auto" : pf::isa_name(previous));
}

PyObject* supported_cpu_isas(PyObject*, PyObject*) {
  const int best = static_cast<int>(pf::supported_isa());
  PyObject* out = PyTuple_New(best + 1);
  if (out == nullptr) return nullptr;
  for (int level = best; level >= 0; --level) {
    PyObject* name = PyUnicode_FromString(pf::isa_name(static_cast<pf::Isa>(level)));
    if (name == nullptr) {
      Py_DECREF(out);
      return nullptr;
    }
    PyTuple_SET_ITEM(out, best - level, name);
  }
  return out;
}

PyObject* simulate_cpu_isa(PyObject*, PyObject* arg) {
  pf::Isa level, previous;
  bool no_cap, previous_real;
  if (!parse_arg(arg, &level, &no_cap)) return nullptr;
  if (!pf::simulate_cpu_isa(level, no_cap, &previous, &previous_real)) {
    PyErr_Format(PyExc_ValueError, "cannot simulate a CPU with '%s': this CPU has less", pf::isa_name(level));
    return nullptr;
  }
  return PyUnicode_FromString(previous_real ? "auto" : pf::isa_name(previous));
}

PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "cpu_isa() -> str: the ISA level the CPU kernels run at now."},
    {"set_cpu_isa", set_cpu_isa, METH_O,
     "set_cpu_isa(name) -> str: run the CPU kernels at most at ISA level `name` ('avx512', 'avx2', 'baseline', or "
     "'auto' for the best this CPU has); returns the previous cap ('auto' if there was none), so that "
     "set_cpu_isa(previous) restores it. ValueError if the CPU lacks that level."},
    {"supported_cpu_isas", supported_cpu_isas, METH_NOARGS,
     "supported_cpu_isas() -> tuple[str, ...]: the ISA levels this CPU can run, best first."},
    {"_simulate_cpu_isa", simulate_cpu_isa, METH_O,
     "_simulate_cpu_isa(name) -> str: for tests, treat the CPU as supporting at most `name` ('auto': the real "
     "CPU); returns the previous simulated level ('auto' if it was the real CPU)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                          "C++ CPU kernels of posteriors_fast (registered with torch.library) and the ISA level "
                          "they run at",
                          -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  // An invalid POSTERIORS_FAST_CPU_ISA was ignored at load: say so once, here.
  for (const char* problem : {pf::isa_env_problem(), pf::isa_retired_env_problem()}) {
    if (problem[0] != '\0' && PyErr_WarnEx(PyExc_RuntimeWarning, problem, 1) < 0) {
      Py_DECREF(module);
      return nullptr;
    }
  }
  return module;
}
