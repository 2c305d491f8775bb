// Python torch.nn.Modules as the parts of a LayeredModel. Each part is a C++ Stem, Block or Head
// that holds the Python module, registers the module's parameters and buffers (the same
// tensors, so when the engine rebinds a parameter with set_data the Python module computes with
// the new storage) and calls the module under the GIL.
//
// Note: every engine entry point releases the GIL (bindings.cpp), so a part takes it for the
// call into Python and gives it back before the engine continues; the engine's own threads
// (the CPU optimizer) never call into Python.

#include <memory>
#include <string>
#include <unordered_map>
#include <utility>

#include "bindings.h"
#include "ferry/check.h"

namespace ferry::python {
namespace {

// The tensors registered by the parts built so far, and by which one, to find tensors two
// parts share.
using Registered = std::unordered_map<const c10::TensorImpl*, std::string>;

const char* signature_of(models::Part kind, bool pass_context) {
  switch (kind) {
    case models::Part::kStem:
      return pass_context ? "stem(input_ids, context) -> hidden" : "stem(input_ids) -> hidden";
    case models::Part::kBlock:
      return pass_context ? "block(hidden, context) -> hidden or a tuple (hidden, ...)"
                          : "block(hidden) -> hidden or a tuple (hidden, ...)";
    case models::Part::kHead:
      return pass_context ? "head(hidden, context) -> logits" : "head(hidden) -> logits";
  }
  return "";
}

// The module under `root` that holds `dotted_name`'s last component, created as empty
// torch::nn::Modules along the way ("layers.0.weight" -> root.layers.0), so that the C++
// names equal the Python ones.
torch::nn::Module& owner_of(torch::nn::Module& root, const std::string& dotted_name,
                            std::string& leaf_name) {
  torch::nn::Module* owner = &root;
  std::size_t start = 0;
  for (std::size_t dot = dotted_name.find('.'); dot != std::string::npos;
       start = dot + 1, dot = dotted_name.find('.', start)) {
    const std::string child = dotted_name.substr(start, dot - start);
    auto children = owner->named_children();
    if (const auto* found = children.find(child)) {
      owner = found->get();
    } else {
      owner = owner->register_module(child, std::make_shared<torch::nn::Module>()).get();
    }
  }
  leaf_name = dotted_name.substr(start);
  return *owner;
}

template <class Base>
class PythonPart : public Base {
 public:
  PythonPart(py::object module, models::Part kind, std::string name, bool pass_context,
             Registered& registered)
      : module_(std::move(module)),
        kind_(kind),
        name_(std::move(name)),
        pass_context_(pass_context) {
    FERRY_CHECK(py::isinstance(module_, py::module_::import("torch.nn").attr("Module")), name_,
                " is a ", type_name(module_), "; every part must be a torch.nn.Module");
    for (const py::handle item : module_.attr("named_parameters")()) {
      const auto entry = item.cast<std::pair<std::string, torch::Tensor>>();
      register_parameter_once(entry.first, entry.second, registered);
    }
    for (const py::handle item : module_.attr("named_buffers")()) {
      const auto entry = item.cast<std::pair<std::string, torch::Tensor>>();
      std::string leaf;
      owner_of(*this, entry.first, leaf).register_buffer(leaf, entry.second);
    }
  }

  // Note: the engine may drop its model without the GIL; the module's reference must still
  // be released under it.
  ~PythonPart() override {
    py::gil_scoped_acquire gil;
    py::object released = std::move(module_);
  }

  torch::Tensor forward(const torch::Tensor& input, const StepContext& context) override {
    py::gil_scoped_acquire gil;
    py::object result = pass_context_ ? module_(input, context) : module_(input);
    if (kind_ == models::Part::kBlock && py::isinstance<py::tuple>(result) && py::len(result) > 0) {
      result = result.cast<py::tuple>()[0];
    }
    FERRY_CHECK(THPVariable_Check(result.ptr()), name_, " returned a ", type_name(result),
                "; the supported signature is ", signature_of(kind_, pass_context_));
    return result.cast<torch::Tensor>();
  }

  void train(bool on) override {
    torch::nn::Module::train(on);
    py::gil_scoped_acquire gil;
    module_.attr("train")(on);
  }

 protected:
  const py::object& module() const { return module_; }

 private:
  // Note: a tensor may belong to one part only, because the engine packs each part's
  // parameters into that part's bundles. The one exception is a head that reuses the stem's
  // embedding (tied weights): the head leaves it to the stem, and the engine keeps the stem's
  // gradients until the head's backward has added to them. A parameter with requires_grad =
  // False is frozen: the engine keeps it apart, with no gradient or optimizer state.
  void register_parameter_once(const std::string& name, const torch::Tensor& parameter,
                                 Registered& registered) {
    const std::string full_name = name_ + "." + name;
    auto [found, inserted] = registered.emplace(parameter.unsafeGetTensorImpl(), full_name);
    if (!inserted) {
      FERRY_CHECK(kind_ == models::Part::kHead && found->second.rfind("stem.", 0) == 0,
                  "parameter ", full_name, " is the same tensor as ", found->second,
                  "; parts may not share parameters, except a head that reuses the stem's "
                  "(tied embeddings)");
      return;
    }
    std::string leaf;
    owner_of(*this, name, leaf).register_parameter(leaf, parameter, parameter.requires_grad());
  }

  py::object module_;
  models::Part kind_;
  std::string name_;
  bool pass_context_;
};

// A stem whose token embedding is its one torch.nn.Embedding, which the engine checks a batch's ids
// against. With none, or several (token and position embeddings alike), it names none: which one
// holds the tokens is the module's business.
class PythonStem final : public PythonPart<Stem> {
 public:
  PythonStem(py::object module, bool pass_context, Registered& registered)
      : PythonPart<Stem>(std::move(module), models::Part::kStem, "stem", pass_context, registered) {
    const py::object embedding_type = py::module_::import("torch.nn").attr("Embedding");
    py::object found = py::none();
    for (const py::handle submodule : this->module().attr("modules")()) {
      if (!py::isinstance(submodule, embedding_type)) continue;
      if (!found.is_none()) return;
      found = py::reinterpret_borrow<py::object>(submodule);
    }
    if (!found.is_none()) token_embedding_ = found.attr("weight").cast<torch::Tensor>();
  }

  torch::Tensor token_embedding() const override { return token_embedding_; }

 private:
  torch::Tensor token_embedding_;
};

}  // namespace

LayeredModel python_model(py::object stem, const py::sequence& blocks, py::object head,
                          bool pass_context) {
  FERRY_CHECK(py::len(blocks) > 0, "a model needs at least one block");
  Registered registered;
  auto python_stem = std::make_shared<PythonStem>(std::move(stem), pass_context, registered);
  std::vector<std::shared_ptr<Block>> python_blocks;
  for (std::size_t i = 0; i < py::len(blocks); ++i) {
    python_blocks.push_back(std::make_shared<PythonPart<Block>>(
        py::reinterpret_borrow<py::object>(blocks[i]), models::Part::kBlock,
        "blocks." + std::to_string(i), pass_context, registered));
  }
  auto python_head = std::make_shared<PythonPart<Head>>(std::move(head), models::Part::kHead,
                                                        "head", pass_context, registered);
  return LayeredModel(std::move(python_stem), std::move(python_blocks), std::move(python_head));
}

void bind_modules(py::module_& module) {
  py::class_<StepContext>(module, "StepContext",
                          "What every part sees in one forward pass (read-only).")
      .def_readonly("positions", &StepContext::positions,
                    "[batch, seq] int64 positions; -1 at padding")
      .def_readonly("attention_mask", &StepContext::attention_mask,
                    "[batch or 1, 1, seq, seq] bool, True where a query may see a key; None "
                    "means plain causal attention")
      .def_readonly("rope_cos", &StepContext::rope_cos, "RoPE table or None")
      .def_readonly("rope_sin", &StepContext::rope_sin, "RoPE table or None");
}

}  // namespace ferry::python
