#pragma once

// ferry._C, the compiled half of `import ferry`: one bind_* function per area, each in the
// translation unit that owns it. The Python package (python/ferry/) wraps these in typed,
// documented classes; the bindings themselves stay thin and use only ferry's public headers.

#include <torch/extension.h>

#include <string>

#include "ferry/model.h"
#include "ferry/tokenizer.h"

namespace ferry::python {

namespace py = pybind11;

// The Python type name of an object, for error messages: "dict", "Linear".
inline std::string type_name(const py::handle& object) {
  return py::str(py::type::of(object).attr("__name__")).cast<std::string>();
}

// Builds a LayeredModel whose stem, blocks and head are Python torch.nn.Modules (modules.cpp).
// With pass_context, every part is called as part(x, context) instead of part(x).
LayeredModel python_model(py::object stem, const py::sequence& blocks, py::object head,
                          bool pass_context);

void bind_modules(py::module_& module);  // StepContext, the Python-module model
void bind_plan(py::module_& module);     // plan(): the planner's dry run
void bind_tokenizer(py::module_& module);  // Tokenizer, load_tokenizer, chat templates (tokenizer.cpp)
// Python holds tokenizers as shared_ptr<Tokenizer>, calling only const methods.
std::shared_ptr<Tokenizer> hold_tokenizer(std::shared_ptr<const Tokenizer> tokenizer);

}  // namespace ferry::python
