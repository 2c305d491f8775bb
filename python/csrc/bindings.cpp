// ferry._C: errors, the engine, models, the data layer and the CPU optimizer kernels.
//
// Note: the engine's entry points convert their Python arguments first, then release the GIL
// for the C++ work. Parts written in Python take it back for their own calls (modules.cpp).

#include "bindings.h"

#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "ferry/check.h"
#include "ferry/data.h"
#include "ferry/dist.h"
#include "ferry/engine.h"
#include "ferry/fs.h"
#include "ferry/io.h"
#include "ferry/job.h"
#include "ferry/memory.h"
#include "ferry/optim.h"
#include "ferry/plan.h"
#include "ferry/version.h"
#include "ferry/zo.h"

namespace ferry::python {
namespace {

// --- data parallelism -------------------------------------------------------------------------

// Note: under torchrun (WORLD_SIZE in the environment) every Engine of the process joins the
// job's world through one communicator, made by the first: a second rendezvous at the same
// MASTER_PORT would find rank 0's store taken (docs/distributed.md).
std::shared_ptr<dist::Communicator> process_communicator(const dist::World& world, torch::Device device) {
  static std::mutex mutex;
  static std::shared_ptr<dist::Communicator> communicator;
  std::lock_guard<std::mutex> lock(mutex);
  if (!communicator) communicator = dist::connect(world, dist::CommunicatorOptions{device});
  return communicator;
}

void join_world(EngineConfig& config) {
  const dist::World world = dist::World::from_environment();
  if (world.world_size == 1) return;
  if (config.device.is_cuda() && !config.device.has_index()) {
    config.device = torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(world.local_rank));
  }
  config.communicator = process_communicator(world, config.device);
}

// --- errors -----------------------------------------------------------------------------------

struct ErrorTypes {
  PyObject* error = nullptr;            // ferry::Error             -> ferry.Error(RuntimeError)
  PyObject* budget_exceeded = nullptr;  // ferry::BudgetExceeded    -> (ferry.Error, MemoryError)
  PyObject* io_error = nullptr;         // ferry::IoException       -> (ferry.Error, OSError)
  PyObject* internal_error = nullptr;   // ferry::InternalError     -> ferry.InternalError
};

ErrorTypes& error_types() {
  static ErrorTypes types;
  return types;
}

PyObject* new_error_type(py::module_& module, const char* name, const char* doc, PyObject* bases) {
  const std::string qualified = std::string("ferry.") + name;
  PyObject* type = PyErr_NewExceptionWithDoc(qualified.c_str(), doc, bases, nullptr);
  if (type == nullptr) throw py::error_already_set();
  module.add_object(name, py::reinterpret_borrow<py::object>(type));
  return type;  // Note: the new reference is kept for the life of the process, like the module.
}

void raise_io_error(const IoException& error) {
  py::object exception = py::reinterpret_borrow<py::object>(error_types().io_error)(error.what());
  // OSError's own fields: str() then reads "[Errno N] <ferry's message>".
  exception.attr("errno") = error.error().error_number;
  exception.attr("strerror") = error.what();
  exception.attr("path") = error.error().path;
  exception.attr("offset") = error.error().offset;
  exception.attr("length") = error.error().length;
  PyErr_SetObject(error_types().io_error, exception.ptr());
}

void bind_errors(py::module_& module) {
  ErrorTypes& types = error_types();
  types.error = new_error_type(module, "Error",
                               "A user or configuration error reported by ferry; the message "
                               "names the bad value and what would be valid.",
                               PyExc_RuntimeError);
  types.budget_exceeded = new_error_type(
      module, "BudgetExceeded",
      "A memory budget cannot hold what was asked for; the message names the tier and the "
      "shortfall.",
      py::make_tuple(py::handle(types.error), py::handle(PyExc_MemoryError)).ptr());
  types.io_error = new_error_type(
      module, "IoError",
      "An I/O failure: errno, path, offset and length as attributes, the whole story in the "
      "message.",
      py::make_tuple(py::handle(types.error), py::handle(PyExc_OSError)).ptr());
  types.internal_error =
      new_error_type(module, "InternalError",
                     "A broken invariant inside ferry: always a bug in ferry.", PyExc_RuntimeError);
  py::register_exception_translator([](std::exception_ptr pointer) {
    try {
      if (pointer) std::rethrow_exception(pointer);
    } catch (const IoException& error) {
      raise_io_error(error);
    } catch (const BudgetExceeded& error) {
      PyErr_SetString(error_types().budget_exceeded, error.what());
    } catch (const Error& error) {
      PyErr_SetString(error_types().error, error.what());
    } catch (const InternalError& error) {
      PyErr_SetString(error_types().internal_error, error.what());
    }
  });
}

// --- batches and results ----------------------------------------------------------------------

// A dict, transformers' BatchEncoding (a UserDict), any collections.abc.Mapping.
bool is_mapping(const py::handle& object) {
  // Note: released, so that no reference is dropped after the interpreter has finalized.
  static const py::handle mapping_type = py::object(py::module_::import("collections.abc").attr("Mapping")).release();
  return py::isinstance(object, mapping_type);
}

// A batch is a mapping, or an object with attributes, holding input_ids and labels, and
// optionally attention_mask and position_ids. Only whether each is a tensor is checked here; what
// the tensors hold the engine checks (data::check_batch).
data::Batch to_batch(const py::handle& batch) {
  const bool mapping = is_mapping(batch);
  auto field = [&](const char* name, bool required) -> torch::Tensor {
    py::object value = py::none();
    if (mapping) {
      if (batch.attr("__contains__")(name).cast<bool>()) value = batch[name];
    } else if (py::hasattr(batch, name)) {
      value = batch.attr(name);
    }
    if (value.is_none()) {
      if (!required) return {};
      throw py::type_error(std::string("a batch needs '") + name +
                           "': pass a dict (any mapping) or an object with input_ids and labels tensors "
                           "(attention_mask and position_ids optional)");
    }
    if (!THPVariable_Check(value.ptr())) {
      throw py::type_error(std::string("batch field '") + name + "' must be a torch.Tensor, not " +
                           type_name(value));
    }
    return value.cast<torch::Tensor>();
  };
  data::Batch result;
  result.input_ids = field("input_ids", true);
  result.labels = field("labels", true);
  result.attention_mask = field("attention_mask", false);
  result.position_ids = field("position_ids", false);
  return result;
}

py::dict to_dict(const data::Batch& batch) {
  py::dict dict;
  dict["input_ids"] = batch.input_ids;
  dict["labels"] = batch.labels;
  dict["attention_mask"] = batch.attention_mask;
  dict["position_ids"] = batch.position_ids;
  return dict;
}

py::dict to_dict(const EngineStats& stats) {
  py::dict tiers;
  py::dict transfers;
  for (int from = 0; from < kTierCount; ++from) {
    const TierStats& tier = stats.store.tiers[from];
    py::dict tier_dict;
    tier_dict["budget_bytes"] = tier.budget_bytes;
    tier_dict["used_bytes"] = tier.used_bytes;
    tier_dict["peak_bytes"] = tier.peak_bytes;
    tier_dict["refusals"] = tier.refusals;
    tiers[to_string(static_cast<Tier>(from))] = tier_dict;
    for (int to = 0; to < kTierCount; ++to) {
      const TransferStats& transfer = stats.store.transfers[from][to];
      if (transfer.transfers == 0) continue;
      py::dict transfer_dict;
      transfer_dict["bytes"] = transfer.bytes;
      transfer_dict["transfers"] = transfer.transfers;
      transfer_dict["busy_seconds"] = transfer.busy_seconds;
      transfer_dict["waited_seconds"] = transfer.waited_seconds;
      transfers[(std::string(to_string(static_cast<Tier>(from))) + "->" +
                 to_string(static_cast<Tier>(to)))
                    .c_str()] = transfer_dict;
    }
  }
  py::dict dict;
  dict["steps"] = stats.steps;
  dict["forward_seconds"] = stats.forward_seconds;
  dict["backward_seconds"] = stats.backward_seconds;
  dict["optimizer_seconds"] = stats.optimizer_seconds;
  dict["optimizer_wait_seconds"] = stats.optimizer_wait_seconds;
  dict["cpu_update_seconds"] = stats.cpu_update_seconds;
  dict["cpu_updated_elements"] = stats.cpu_updated_elements;
  dict["tiers"] = tiers;
  dict["transfers"] = transfers;
  return dict;
}

std::string describe(const StepResult& result) {
  return detail::concat("StepResult(step=", result.step, ", loss=", result.loss, ", lr=", result.lr,
                        ", grad_norm=", result.grad_norm, ", loss_scale=", result.loss_scale,
                        ", skipped=", result.skipped ? "True" : "False", ", tokens=", result.tokens,
                        ")");
}

// --- models -----------------------------------------------------------------------------------

// A parameter dtype by its safetensors name; only the float types a model can compute in.
DType model_dtype(const std::string& name) {
  const std::optional<DType> dtype = parse_dtype(name);
  FERRY_CHECK(dtype == DType::kF32 || dtype == DType::kBF16 || dtype == DType::kF16, "dtype '",
              name, "' is not valid: use F32, BF16 or F16");
  return *dtype;
}

// A preset name ("tiny-llama", "llama3-8b") or a Hugging Face directory, as the CLI reads it,
// with LoRA adapters of `lora_rank` (0: none) over its frozen base.
LayeredModel load_model(const std::string& name, std::uint64_t seed, const std::optional<std::string>& dtype,
                        std::int64_t layers, std::int64_t lora_rank, double lora_alpha, double lora_dropout,
                        const std::vector<std::string>& lora_targets) {
  models::LoraConfig lora;
  lora.rank = lora_rank;
  lora.alpha = lora_alpha;
  lora.dropout = lora_dropout;
  lora.targets = lora_targets;
  const bool is_directory = name.find('/') != std::string::npos || fs::is_directory(name);
  if (is_directory) {
    FERRY_CHECK(layers == 0, "layers = ", layers, " truncates a preset; '", name, "' is a Hugging Face directory, "
                "which keeps its own blocks");
    models::LoadOptions options;
    if (dtype) options.dtype = model_dtype(*dtype);
    options.lora = lora;
    options.seed = seed;
    return models::from_pretrained(name, options);
  }
  models::ModelConfig config = models::truncated(models::preset(name), layers);
  if (dtype) config.dtype = model_dtype(*dtype);
  config.lora = lora;
  return models::build(config, seed);
}

void bind_models(py::module_& module) {
  py::class_<LayeredModel>(module, "LayeredModel")
      .def_property_readonly("num_blocks", &LayeredModel::num_blocks)
      .def_property_readonly("parameter_count", &LayeredModel::parameter_count)
      .def_property_readonly("hf_config",
                             [](const LayeredModel& model) -> std::optional<std::string> {
                               if (!model.config()) return std::nullopt;
                               return model.config()->to_hf_json();
                             })
      .def("parameters", &LayeredModel::parameters)
      .def("to",
           [](LayeredModel& model, const std::string& device, const std::optional<std::string>& dtype) {
             if (dtype) {
               model.to(torch::Device(device), to_scalar_type(model_dtype(*dtype)));
             } else {
               model.to(torch::Device(device));
             }
           },
           py::arg("device"), py::arg("dtype") = std::nullopt)
      .def("forward",
           [](LayeredModel& model, const torch::Tensor& tokens, const std::optional<torch::Tensor>& padding_mask) {
             return model.forward(tokens, padding_mask.value_or(torch::Tensor()));
           },
           py::arg("tokens"), py::arg("padding_mask") = std::nullopt, py::call_guard<py::gil_scoped_release>())
      .def("loss", &LayeredModel::loss, py::arg("logits"), py::arg("labels"),
           py::call_guard<py::gil_scoped_release>());
  module.def("load_model", &load_model, py::arg("name"), py::arg("seed") = 0,
             py::arg("dtype") = std::nullopt, py::arg("layers") = 0, py::arg("lora_rank") = 0,
             py::arg("lora_alpha") = 8.0, py::arg("lora_dropout") = 0.0,
             py::arg("lora_targets") = std::vector<std::string>{"all-linear"});
  module.def("python_model", &python_model, py::arg("stem"), py::arg("blocks"), py::arg("head"),
             py::arg("pass_context") = false);
  module.def("preset_names", &models::preset_names);
  module.def("causal_lm_loss", &causal_lm_loss, py::arg("logits"), py::arg("labels"));
}

// --- engine -----------------------------------------------------------------------------------

void bind_engine(py::module_& module) {
  py::class_<StepResult>(module, "StepResult",
                         "What one optimizer step did: what Engine.train_step and Engine.step return.")
      .def_readonly("step", &StepResult::step, "Optimizer steps taken so far, skipped ones included.")
      .def_readonly("loss", &StepResult::loss,
                    "Mean loss of the step's micro-batches (zo2: of both perturbed losses over the samples).")
      .def_readonly("lr", &StepResult::lr, "The learning rate this step used.")
      .def_readonly("grad_norm", &StepResult::grad_norm,
                    "Global gradient norm before clipping; NaN when the gradients were not finite.")
      .def_readonly("loss_scale", &StepResult::loss_scale, "The fp16 loss scale (1 otherwise).")
      .def_readonly("skipped", &StepResult::skipped,
                    "True when the gradients were not finite (fp16 overflow) and nothing was updated.")
      .def_readonly("tokens", &StepResult::tokens, "Input tokens over the step's micro-batches.")
      .def_readonly("loss_plus", &StepResult::loss_plus, "zo2: per sample, the loss at theta + eps z.")
      .def_readonly("loss_minus", &StepResult::loss_minus, "zo2: per sample, the loss at theta - eps z.")
      .def_readonly("projected_grads", &StepResult::projected_grads,
                    "zo2: per sample, the projected gradient (loss_plus - loss_minus) / (2 eps).")
      .def("__repr__", &describe);

  module.def("engine_config_keys", &engine_config_keys);
  module.def(
      "job_setting_keys",
      [] {
        std::vector<std::string> keys;
        for (const JobSetting& setting : job_settings()) keys.push_back(setting.key);
        return keys;
      },
      "Every setting of a job (ferry/job.h), as its job-file key.");
  module.def(
      "complete_job", [](const std::string& given) { return complete_job(nlohmann::json::parse(given)).dump(); },
      py::arg("given"), "The job's settings (JSON) with every default filled in, as ferry finetune resolves them.");
  module.def(
      "engine_precision",
      [](const std::string& settings) { return std::string(to_string(engine_config_from_json(settings).precision)); },
      py::arg("settings"), "The precision an engine built with these settings computes in (\"auto\" resolved).");
  module.def(
      "job_warmup_steps",
      [](const std::string& job, std::int64_t total_steps) {
        return job_warmup_steps(nlohmann::json::parse(job), total_steps);
      },
      py::arg("job"), py::arg("total_steps"), "The warm-up steps of a completed job over a run of total_steps.");
  module.def("zo_step_seed", &zo_step_seed, py::arg("seed"), py::arg("step"), py::arg("sample"),
             "The seed of zo2's direction for one sample of one step (counted from 1).");

  py::class_<Engine>(module, "Engine")
      .def(py::init([](const LayeredModel& model, const std::string& settings_json) {
             EngineConfig config = engine_config_from_json(settings_json);
             py::gil_scoped_release release;
             join_world(config);
             return std::make_unique<Engine>(model, std::move(config));
           }),
           py::arg("model"), py::arg("settings_json"))
      .def("forward",
           [](Engine& engine, const py::handle& batch) {
             data::Batch converted = to_batch(batch);
             py::gil_scoped_release release;
             return engine.forward(converted);
           })
      .def("backward", &Engine::backward, py::call_guard<py::gil_scoped_release>())
      .def("step", &Engine::step, py::call_guard<py::gil_scoped_release>())
      .def("train_step",
           [](Engine& engine, const py::handle& batch) {
             data::Batch converted = to_batch(batch);
             py::gil_scoped_release release;
             return engine.train_step(converted);
           })
      .def("evaluate",
           [](Engine& engine, const py::handle& batch) {
             data::Batch converted = to_batch(batch);
             py::gil_scoped_release release;
             return engine.evaluate(converted);
           })
      .def("flush", &Engine::flush, py::call_guard<py::gil_scoped_release>())
      .def("logits", &Engine::logits, py::call_guard<py::gil_scoped_release>())
      .def("generate", &Engine::generate, py::arg("prompt"), py::arg("max_new_tokens"),
           py::arg("stop_token") = std::nullopt, py::call_guard<py::gil_scoped_release>())
      .def(
          "generate_sampled",
          [](Engine& engine, const std::vector<std::int64_t>& prompt, std::int64_t max_new_tokens, double temperature,
             double top_p, std::int64_t top_k, const std::vector<std::int64_t>& stop_ids, std::uint64_t seed,
             std::int64_t vocab_size) {
            GenerationOptions options;
            options.vocab_size = vocab_size;
            options.max_new_tokens = max_new_tokens;
            options.temperature = temperature;
            options.top_p = top_p;
            options.top_k = top_k;
            options.stop_ids = stop_ids;
            options.seed = seed;
            py::gil_scoped_release release;
            return generate(engine, prompt, options);
          },
          py::arg("prompt"), py::arg("max_new_tokens"), py::arg("temperature"), py::arg("top_p"), py::arg("top_k"),
          py::arg("stop_ids"), py::arg("seed"), py::arg("vocab_size") = 0)
      .def(
          "evaluate_batches",
          [](Engine& engine, const py::sequence& batches) {
            std::vector<data::Batch> converted;
            for (const py::handle& batch : batches) converted.push_back(to_batch(batch));
            EvaluationResult result;
            {
              py::gil_scoped_release release;
              result = evaluate(engine, converted);
            }
            return py::dict(py::arg("loss") = result.loss, py::arg("perplexity") = result.perplexity,
                            py::arg("tokens") = result.tokens, py::arg("batches") = result.batches);
          },
          py::arg("batches"))
      .def("save", &Engine::save, py::arg("dir"), py::arg("extra_json") = "{}",
           py::call_guard<py::gil_scoped_release>())
      .def("load", &Engine::load, py::call_guard<py::gil_scoped_release>())
      .def(
          "export_pretrained",
          [](Engine& engine, const std::string& dir, const std::string& precision) {
            const Precision chosen = precision.empty() ? engine.config().precision : parse_precision(precision);
            py::gil_scoped_release release;
            engine.export_pretrained(dir, chosen);
          },
          py::arg("dir"), py::arg("precision") = "")
      .def("export_adapter", &Engine::export_adapter, py::arg("dir"), py::arg("base_model_name_or_path") = "",
           py::call_guard<py::gil_scoped_release>())
      .def("write_trace", &Engine::write_trace, py::call_guard<py::gil_scoped_release>())
      .def("stats", [](const Engine& engine) { return to_dict(engine.stats()); })
      .def("parameters", [](const Engine& engine) { return engine.model().parameters(); })
      .def_property_readonly("steps_taken", &Engine::steps_taken)
      .def_property_readonly("current_lr", &Engine::current_lr)
      .def_property_readonly("parameter_count",
                             [](const Engine& engine) { return engine.parameter_count(); })
      .def_property_readonly("vocab_size", &Engine::vocab_size)
      .def_property_readonly("num_blocks",
                             [](const Engine& engine) { return engine.model().num_blocks(); })
      .def_property_readonly("mode",
                             [](const Engine& engine) { return to_string(engine.config().mode); })
      .def_property_readonly(
          "precision", [](const Engine& engine) { return to_string(engine.config().precision); })
      .def_property_readonly("device",
                             [](const Engine& engine) { return engine.config().device.str(); })
      .def_property_readonly("rank",
                             [](const Engine& engine) {
                               return engine.config().communicator ? engine.config().communicator->rank() : 0;
                             })
      .def_property_readonly("world_size", [](const Engine& engine) {
        return engine.config().communicator ? engine.config().communicator->world_size() : 1;
      });
}

// --- data -------------------------------------------------------------------------------------

data::Split parse_split(const std::string& name) {
  FERRY_CHECK(name == "train" || name == "eval", "split '", name,
              "' is not valid: use 'train' or 'eval'");
  return name == "train" ? data::Split::kTrain : data::Split::kEval;
}

// Note: the data layer hands out datasets as shared_ptr<const Dataset>; pybind11 holds them
// as shared_ptr<Dataset> and only ever calls const methods.
using DatasetHolder = std::shared_ptr<data::Dataset>;

DatasetHolder hold(std::shared_ptr<const data::Dataset> dataset) {
  return std::const_pointer_cast<data::Dataset>(std::move(dataset));
}

// An int from Python (numpy's integers and one-element integer tensors included, bools not),
// named `where` when it is none.
std::int64_t integer_at(const py::handle& value, const std::string& where, const char* what) {
  if (PyBool_Check(value.ptr()) || !PyIndex_Check(value.ptr())) {
    throw py::type_error(where + " is " + py::repr(value).cast<std::string>() + " (" + type_name(value) + "): " +
                         what + " are ints");
  }
  int overflow = 0;
  const py::object index = py::reinterpret_steal<py::object>(PyNumber_Index(value.ptr()));
  if (!index) throw py::error_already_set();
  const long long result = PyLong_AsLongLongAndOverflow(index.ptr(), &overflow);
  if (overflow != 0) {
    throw py::value_error(where + " is " + py::repr(value).cast<std::string>() + ", which does not fit in int64");
  }
  return result;
}

// One example's tokens (or labels, `of` names which): a 1-D integer tensor, or an iterable of ints
// (a list, a numpy array).
std::vector<std::int64_t> example_ids(const py::handle& item, const char* of, std::size_t index) {
  const std::string where = std::string(of) + "[" + std::to_string(index) + "]";
  if (THPVariable_Check(item.ptr())) {
    const torch::Tensor tensor = item.cast<torch::Tensor>();
    const std::string dtype = py::str(item.attr("dtype")).cast<std::string>();
    if (!c10::isIntegralType(tensor.scalar_type(), /*includeBool=*/false)) {
      throw py::type_error(where + " is a tensor of " + dtype + ": ids are integers (torch.int64)");
    }
    if (tensor.dim() != 1) {
      throw py::value_error(where + " has shape " + detail::concat(tensor.sizes()) +
                            ": each is one sequence of ids, a 1-D tensor (for one sequence, pass [ids])");
    }
    const torch::Tensor ids = tensor.to(torch::kCPU, torch::kLong).contiguous();
    return {ids.data_ptr<std::int64_t>(), ids.data_ptr<std::int64_t>() + ids.numel()};
  }
  if (is_mapping(item)) {
    throw py::type_error(where + " is a " + type_name(item) + ": each is a sequence of ids; of a Hugging Face "
                         "dataset's rows, pass the columns, dataset[\"input_ids\"]");
  }
  if (py::isinstance<py::str>(item) || py::isinstance<py::bytes>(item) || !py::isinstance<py::iterable>(item)) {
    throw py::type_error(where + " is " + py::repr(item).cast<std::string>() + " (" + type_name(item) +
                         "): each is a list of ids or a 1-D integer tensor (text: tokenize it first, e.g. with "
                         "ferry.Tokenizer.encode)");
  }
  std::vector<std::int64_t> ids;
  for (const py::handle value : item) {
    ids.push_back(integer_at(value, where + "[" + std::to_string(ids.size()) + "]", "ids"));
  }
  return ids;
}

// `argument`, which must be an iterable (not text), named in the message with what it holds.
py::iterable iterable_argument(const py::object& argument, const char* name, const char* holding) {
  if (py::isinstance<py::str>(argument) || !py::isinstance<py::iterable>(argument)) {
    throw py::type_error(std::string(name) + " is " + py::repr(argument).cast<std::string>() + " (" +
                         type_name(argument) + "): give an iterable of " + holding);
  }
  return py::reinterpret_borrow<py::iterable>(argument);
}

// Hugging Face's labels, aligned with the tokens: the token where it is learned, kIgnoreIndex where
// not. They become the example's learned flags.
void learn_from_labels(const py::object& labels, std::vector<data::Example>& examples) {
  std::size_t index = 0;
  for (const py::handle item : iterable_argument(labels, "labels", "label sequences, one per example")) {
    const std::vector<std::int64_t> row = example_ids(item, "labels", index);
    if (index >= examples.size()) {
      ++index;
      continue;
    }
    data::Example& example = examples[index];
    if (row.size() != example.tokens.size()) {
      throw py::value_error("labels[" + std::to_string(index) + "] has " + std::to_string(row.size()) +
                            " labels for the " + std::to_string(example.tokens.size()) + " tokens of examples[" +
                            std::to_string(index) + "]: give one per token");
    }
    example.learned.resize(row.size());
    for (std::size_t position = 0; position < row.size(); ++position) {
      const bool learned = row[position] != data::kIgnoreIndex;
      if (learned && row[position] != example.tokens[position]) {
        throw py::value_error(detail::concat(
            "labels[", index, "][", position, "] is ", row[position], " but examples[", index, "][", position, "] is ",
            example.tokens[position], ": labels are aligned with the tokens, not shifted: the token where it is "
            "learned, ", data::kIgnoreIndex, " where not"));
      }
      example.learned[position] = learned;
    }
    ++index;
  }
  if (index != examples.size()) {
    throw py::value_error("labels has " + std::to_string(index) + " sequences for " + std::to_string(examples.size()) +
                          " examples: give one per example");
  }
}

DatasetHolder dataset_from_lists(const py::object& examples, const py::object& prompt_lengths,
                                 const py::object& labels, std::optional<std::int64_t> vocab_size,
                                 std::string name) {
  FERRY_CHECK(!vocab_size || *vocab_size > 0, "vocab_size = ", vocab_size.value_or(0),
              " is not valid: it must be at least 1 (or None)");
  if (!prompt_lengths.is_none() && !labels.is_none()) {
    throw py::type_error("give prompt_lengths or labels, not both: each says which tokens are learned");
  }
  std::vector<data::Example> converted;
  for (const py::handle item : iterable_argument(examples, "examples", "examples, each a list of token ids or a "
                                                 "1-D integer tensor")) {
    converted.push_back({example_ids(item, "examples", converted.size()), 0, {}});
  }
  if (!labels.is_none()) learn_from_labels(labels, converted);
  if (!prompt_lengths.is_none()) {
    std::size_t index = 0;
    for (const py::handle value : iterable_argument(prompt_lengths, "prompt_lengths", "ints, one per example")) {
      const std::string where = "prompt_lengths[" + std::to_string(index) + "]";
      const std::int64_t length = integer_at(value, where, "prompt lengths");
      if (index < converted.size()) converted[index].prompt_tokens = length;
      ++index;
    }
    if (index != converted.size()) {
      throw py::value_error("prompt_lengths has " + std::to_string(index) + " entries for " +
                            std::to_string(converted.size()) + " examples: give one per example (0: learn it whole)");
    }
  }
  return hold(data::make_dataset(std::move(name), std::move(converted), vocab_size));
}

void bind_data(py::module_& module) {
  py::class_<data::Dataset, DatasetHolder>(
      module, "Dataset",
      "Random access to a dataset's examples (docs/data.md). ``len(dataset)`` examples; "
      "``dataset[i]`` is the pair (token ids, prompt length): the number of leading tokens that "
      "answer-only training does not learn. Made by :func:`ferry.data.make_dataset`, "
      ":func:`ferry.data.open_dataset` and :func:`ferry.data.addition_dataset`; read in batches by "
      ":class:`ferry.data.DataLoader`.")
      .def("__len__", &data::Dataset::size, "The number of examples.")
      .def("__getitem__",
           [](const data::Dataset& dataset, std::int64_t index) {
             if (index < 0 || index >= dataset.size()) throw py::index_error();
             data::Example example = dataset.get(index);
             return py::make_tuple(example.tokens, example.prompt_tokens);
           },
           py::arg("index"), "Example ``index`` as (list of token ids, prompt length).")
      .def("learned",
           [](const data::Dataset& dataset, std::int64_t index) {
             if (index < 0 || index >= dataset.size()) throw py::index_error();
             const data::Example example = dataset.get(index);
             std::vector<bool> learned(example.tokens.size());
             for (std::size_t i = 0; i < learned.size(); ++i) {
               learned[i] = example.learned.empty() ? static_cast<std::int64_t>(i) >= example.prompt_tokens
                                                    : example.learned[i] != 0;
             }
             return learned;
           },
           py::arg("index"),
           "Per token of example ``index``, whether answer-only training learns it: the tokens after "
           "the prompt, or a conversation's assistant turns.")
      .def(
          "summary",
          [](const data::Dataset& dataset, std::int64_t sequence_length) {
            const data::DatasetSummary summary = data::summarize(dataset, sequence_length);
            return py::dict(py::arg("examples") = summary.examples, py::arg("tokens") = summary.tokens,
                            py::arg("longest") = summary.longest, py::arg("longer_than") = summary.longer_than,
                            py::arg("learned_tokens") = summary.learned_tokens);
          },
          py::arg("sequence_length"),
          "Counts over every example, as ``ferry finetune`` prints them before training: ``examples``, "
          "``tokens``, ``learned_tokens`` (what answer-only training learns), ``longest`` (the longest "
          "example's tokens) and ``longer_than`` (examples longer than ``sequence_length``, which a loader "
          "without packing truncates).")
      .def_property_readonly("name", &data::Dataset::name,
                             "Names the source in error messages: its path, or what made it.");
  module.def("make_dataset", &dataset_from_lists, py::arg("examples"), py::arg("prompt_lengths") = py::none(),
             py::arg("labels") = py::none(), py::arg("vocab_size") = std::nullopt, py::arg("name") = "the examples",
             "See ferry.data.make_dataset.");
  module.def(
      "open_dataset",
      [](const std::string& path, std::int64_t example_tokens, std::shared_ptr<Tokenizer> tokenizer,
         const std::string& data_format, const std::string& chat_template) {
        data::TextOptions options;
        options.tokenizer = std::move(tokenizer);
        options.format = data::parse_data_format(data_format);
        options.chat_template = chat_template;
        py::gil_scoped_release release;
        return hold(data::open_dataset(path, example_tokens, options));
      },
      py::arg("path"), py::arg("example_tokens"), py::arg("tokenizer") = nullptr, py::arg("data_format") = "auto",
      py::arg("chat_template") = "", "See ferry.data.open_dataset.");
  module.def(
      "addition_problems",
      [](std::int64_t max_digits, std::uint64_t seed, const std::string& split,
         std::int64_t count) {
        std::vector<std::pair<std::string, std::string>> problems;
        for (auto& problem :
             data::addition_problems({max_digits, seed}, parse_split(split), count)) {
          problems.emplace_back(problem.prompt, problem.completion);
        }
        return problems;
      },
      py::arg("max_digits"), py::arg("seed"), py::arg("split"), py::arg("count"),
      "See ferry.data.addition_problems.");
  module.def(
      "addition_dataset",
      [](std::int64_t max_digits, std::uint64_t seed, const std::string& split,
         std::int64_t count) {
        return hold(data::addition_dataset({max_digits, seed}, parse_split(split), count));
      },
      py::arg("max_digits"), py::arg("seed"), py::arg("split"), py::arg("count"),
      "See ferry.data.addition_dataset.");

  py::class_<data::ByteTokenizer>(
      module, "ByteTokenizer",
      "The byte-level tokenizer of the presets and the demo task: ids 0-255 are the bytes of the UTF-8 "
      "text, then BOS (256), EOS (257) and PAD (258); VOCAB_SIZE is 259.")
      .def(py::init<>())
      .def("encode", &data::ByteTokenizer::encode, py::arg("text"), "The UTF-8 bytes of ``text`` as ids.")
      .def("decode", &data::ByteTokenizer::decode, py::arg("ids"),
           "The text of ``ids``, special tokens dropped; an id of 259 or above raises ferry.Error.")
      .def_readonly_static("BOS", &data::ByteTokenizer::kBos, "The beginning-of-sequence id, 256.")
      .def_readonly_static("EOS", &data::ByteTokenizer::kEos, "The end-of-sequence id, 257.")
      .def_readonly_static("PAD", &data::ByteTokenizer::kPad, "The padding id, 258.")
      .def_readonly_static("VOCAB_SIZE", &data::ByteTokenizer::kVocabSize, "The number of ids, 259.");

  py::class_<data::DataLoader>(module, "DataLoader", "The C++ loader behind ferry.data.DataLoader.")
      .def(py::init([](DatasetHolder dataset, std::int64_t batch_size, std::int64_t sequence_length,
                       bool pack, bool answer_only, bool shuffle, std::uint64_t seed,
                       std::optional<std::int64_t> vocab_size, std::optional<std::int64_t> pad_token,
                       bool single_pass) {
             data::LoaderOptions options;
             if (pad_token) options.pad_token = *pad_token;
             options.single_pass = single_pass;
             options.batch_size = batch_size;
             options.sequence_length = sequence_length;
             options.pack = pack;
             options.answer_only = answer_only;
             options.shuffle = shuffle;
             options.seed = seed;
             options.vocab_size = vocab_size;
             return std::make_unique<data::DataLoader>(std::move(dataset), options);
           }),
           py::arg("dataset"), py::arg("batch_size"), py::arg("sequence_length"), py::arg("pack"),
           py::arg("answer_only"), py::arg("shuffle"), py::arg("seed"),
           py::arg("vocab_size") = std::nullopt, py::arg("pad_token") = std::nullopt,
           py::arg("single_pass") = false)
      .def("next", [](data::DataLoader& loader) { return to_dict(loader.next()); }, "The next batch, as a dict.")
      .def_property_readonly("finished", &data::DataLoader::finished, "A single pass is over.")
      .def("state", [](const data::DataLoader& loader) { return loader.state().to_json(); },
           "The position in the stream, as JSON.")
      .def("restore", [](data::DataLoader& loader, const std::string& state) {
        loader.restore(data::LoaderState::from_json(state));
      }, py::arg("state"), "Continues from what state() returned.");
}

// --- CPU optimizer kernels --------------------------------------------------------------------

void check_cpu_contiguous(const char* what, const torch::Tensor& tensor) {
  FERRY_CHECK(
      tensor.device().is_cpu() && tensor.layout() == torch::kStrided && tensor.is_contiguous(),
      what, " must be a dense, contiguous CPU tensor; got one on ", tensor.device(),
      tensor.is_contiguous() ? "" : " that is not contiguous");
}

optim::FloatSpan float_span(const char* what, const torch::Tensor& tensor, std::int64_t numel) {
  check_cpu_contiguous(what, tensor);
  FERRY_CHECK(tensor.scalar_type() == torch::kFloat, what, " must be float32, not ",
              tensor.scalar_type());
  FERRY_CHECK(tensor.numel() == numel, what, " has ", tensor.numel(), " elements; expected ",
              numel);
  return {tensor.data_ptr<float>(), numel};
}

optim::DType low_precision_dtype(const char* what, const torch::Tensor& tensor) {
  switch (tensor.scalar_type()) {
    case torch::kBFloat16:
      return optim::DType::kBF16;
    case torch::kHalf:
      return optim::DType::kF16;
    default:
      FERRY_CHECK(false, what, " must be bfloat16 or float16, not ", tensor.scalar_type());
  }
  return optim::DType::kF32;
}

optim::GradSpan grad_span(const torch::Tensor& grad, std::int64_t numel) {
  check_cpu_contiguous("grad", grad);
  FERRY_CHECK(grad.numel() == numel, "grad has ", grad.numel(), " elements; expected ", numel);
  if (grad.scalar_type() == torch::kFloat)
    return optim::GradSpan::f32(grad.data_ptr<float>(), numel);
  return {grad.data_ptr(), numel, low_precision_dtype("grad", grad)};
}

optim::OutputSpan output_span(const std::optional<torch::Tensor>& out, std::int64_t numel) {
  if (!out) return {};
  check_cpu_contiguous("out", *out);
  FERRY_CHECK(out->numel() == numel, "out has ", out->numel(), " elements; expected ", numel);
  return {static_cast<std::uint16_t*>(out->data_ptr()), numel, low_precision_dtype("out", *out)};
}

optim::StepContext step_context(std::int64_t step) {
  FERRY_CHECK(step >= 1, "step = ", step, " is invalid: the first step is 1");
  optim::StepContext context;
  context.step = step;
  return context;
}

// adamw_step and adam_step: the same arguments, each its own parameter struct and kernel.
template <typename Params,
          optim::StepReport (*Step)(const Params&, const optim::StepContext&, optim::FloatSpan,
                                    optim::FloatSpan, optim::FloatSpan, optim::GradSpan,
                                    optim::OutputSpan)>
void def_adam_step(py::module_& module, const char* name) {
  module.def(
      name,
      [](const torch::Tensor& master, const torch::Tensor& exp_avg, const torch::Tensor& exp_avg_sq,
         const torch::Tensor& grad, std::int64_t step, double lr, double beta1, double beta2,
         double eps, double weight_decay, const std::optional<torch::Tensor>& out) {
        const std::int64_t n = master.numel();
        return Step({lr, beta1, beta2, eps, weight_decay}, step_context(step),
                    float_span("master", master, n), float_span("exp_avg", exp_avg, n),
                    float_span("exp_avg_sq", exp_avg_sq, n), grad_span(grad, n), output_span(out, n))
            .skipped;
      },
      py::arg("master"), py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("grad"),
      py::arg("step"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
      py::arg("weight_decay"), py::arg("out") = std::nullopt,
      py::call_guard<py::gil_scoped_release>());
}

void bind_optim(py::module_& module) {
  def_adam_step<optim::AdamWParams, optim::adamw_step>(module, "adamw_step");
  def_adam_step<optim::AdamParams, optim::adam_step>(module, "adam_step");
  module.def(
      "sgd_step",
      [](const torch::Tensor& master, const std::optional<torch::Tensor>& momentum_buffer,
         const torch::Tensor& grad, std::int64_t step, double lr, double momentum, double dampening,
         double weight_decay, bool nesterov, const std::optional<torch::Tensor>& out) {
        const std::int64_t n = master.numel();
        const optim::FloatSpan buffer = momentum_buffer
                                            ? float_span("momentum_buffer", *momentum_buffer, n)
                                            : optim::FloatSpan{};
        return optim::sgd_step({lr, momentum, dampening, weight_decay, nesterov},
                               step_context(step), float_span("master", master, n), buffer,
                               grad_span(grad, n), output_span(out, n))
            .skipped;
      },
      py::arg("master"), py::arg("momentum_buffer"), py::arg("grad"), py::arg("step"),
      py::arg("lr"), py::arg("momentum"), py::arg("dampening"), py::arg("weight_decay"),
      py::arg("nesterov"), py::arg("out") = std::nullopt, py::call_guard<py::gil_scoped_release>());
  module.def(
      "adagrad_step",
      [](const torch::Tensor& master, const torch::Tensor& state_sum, const torch::Tensor& grad,
         std::int64_t step, double lr, double lr_decay, double weight_decay, double eps,
         const std::optional<torch::Tensor>& out) {
        const std::int64_t n = master.numel();
        return optim::adagrad_step({lr, lr_decay, weight_decay, eps}, step_context(step),
                                   float_span("master", master, n),
                                   float_span("state_sum", state_sum, n), grad_span(grad, n),
                                   output_span(out, n))
            .skipped;
      },
      py::arg("master"), py::arg("state_sum"), py::arg("grad"), py::arg("step"), py::arg("lr"),
      py::arg("lr_decay"), py::arg("weight_decay"), py::arg("eps"), py::arg("out") = std::nullopt,
      py::call_guard<py::gil_scoped_release>());
  module.def("check_adamw",
             [](double lr, double beta1, double beta2, double eps, double weight_decay) {
               optim::check_params(optim::AdamWParams{lr, beta1, beta2, eps, weight_decay});
             });
  module.def("check_adam",
             [](double lr, double beta1, double beta2, double eps, double weight_decay) {
               optim::check_params(optim::AdamParams{lr, beta1, beta2, eps, weight_decay});
             });
  module.def("check_sgd", [](double lr, double momentum, double dampening, double weight_decay,
                             bool nesterov) {
    optim::check_params(optim::SgdParams{lr, momentum, dampening, weight_decay, nesterov});
  });
  module.def("check_adagrad", [](double lr, double lr_decay, double weight_decay, double eps) {
    optim::check_params(optim::AdagradParams{lr, lr_decay, weight_decay, eps});
  });
  module.def(
      "zo_normals",
      [](std::uint64_t seed, std::uint64_t stream, std::int64_t count) {
        FERRY_CHECK(count >= 0, "count = ", count, " is invalid: it must be >= 0");
        torch::Tensor out = torch::empty({count}, torch::kFloat);
        optim::zo_normals({seed, stream}, 0, out.data_ptr<float>(), count);
        return out;
      },
      py::arg("seed"), py::arg("stream"), py::arg("count"),
      "The first `count` normals of zo2's direction (seed, stream); the engine's stream is the "
      "part's index (stem 0, blocks 1.., head last).");
  module.def("active_isa", [] { return std::string(optim::isa_name(optim::active_isa())); });
  module.def("set_isa", [](const std::string& name) { optim::set_isa(optim::parse_isa(name)); });
  module.def("num_threads", &optim::num_threads);
  module.def("set_num_threads", &optim::set_num_threads);
}

}  // namespace

void bind_plan(py::module_& module) {
  module.def(
      "plan",
      [](const std::string& model, const std::string& mode, std::int64_t batch, std::int64_t seq,
         const std::string& hardware, const std::string& calibration, const std::string& attention,
         const std::string& settings_json, const std::string& trace_path, int world_size, double link_gbps,
         const std::string& measured_json) {
        PlanRequest request;
        request.model_name = model;
        if (!model.empty() && model.front() == '{') {  // a model's config.json, as text
          request.model_name = "the engine's model";
          request.model = models::ModelConfig::from_hf_json(model, "the engine's model config");
        } else if (model.find('/') == std::string::npos) {
          request.model = models::preset(model);
        } else {
          FERRY_CHECK(fs::is_directory(model), "model ", model,
                      " is neither a preset nor a directory with a Hugging Face config.json");
          request.model = models::ModelConfig::from_hf_file(model + "/config.json");
        }
        request.batch = batch;
        request.seq = seq;
        request.engine = engine_config_from_json(settings_json);
        request.engine.mode = parse_mode(mode);
        // What the settings give is kept; the rest the planner chooses. (settings_json is
        // json.dumps of a dict of engine settings: a key is present when its quoted name is.)
        auto given = [&](const char* key) {
          return settings_json.find(std::string("\"") + key + "\"") != std::string::npos;
        };
        request.choose_activations = !given("activations");
        request.choose_host_blocks = !given("fuyou_host_blocks");
        request.choose_micro_batch_order = !given("micro_batch_order");
        if (!attention.empty()) request.attention = parse_attention_kernel(attention);
        FERRY_CHECK(hardware.empty() || calibration.empty(),
                    "plan() takes at most one of hardware= (a preset: ",
                    [] {
                      std::string names;
                      for (const std::string& name : hardware_preset_names()) {
                        names += (names.empty() ? "" : ", ") + name;
                      }
                      return names;
                    }(),
                    ") and calibration= (a file from `ferry bench calibrate`); with neither, a quick "
                    "calibration of this machine");
        if (!hardware.empty()) {
          request.hardware = hardware_preset(hardware);
        } else if (!calibration.empty()) {
          request.hardware = Hardware::load(calibration);
        } else {
          CalibrationOptions quick;
          quick.nvme_directories = request.engine.nvme_directories;
          quick.nvme_bytes = std::uint64_t{32} << 20;
          quick.repeat = 1;
          quick.quick = true;
          request.hardware = calibrate(quick);
        }
        if (link_gbps > 0) request.hardware.link_gbps = link_gbps;
        request.world_size = world_size;
        if (!measured_json.empty()) request.measured = measured_compute_from_json(measured_json, "plan(measured=)");
        // "auto" precision is the target's, as `ferry plan` has it: bf16 when it has a GPU.
        if (nlohmann::json::parse(settings_json).value("precision", "") == "auto") {
          request.engine.precision = preferred_precision(request.hardware);
        }
        py::gil_scoped_release release;
        const Plan plan = make_plan(request);
        if (!trace_path.empty()) write_plan_trace(plan, trace_path);
        return std::make_pair(plan_to_json(plan), format_plan(plan));
      },
      py::arg("model"), py::arg("mode"), py::arg("batch"), py::arg("seq"), py::arg("hardware"),
      py::arg("calibration"), py::arg("attention"), py::arg("settings_json"), py::arg("trace_path"),
      py::arg("world_size"), py::arg("link_gbps"), py::arg("measured_json"),
      "The planner's dry run (include/ferry/plan.h): (the plan as JSON, the table ferry plan prints).");
  module.def(
      "profile_compute",
      [](const LayeredModel& model, const std::string& settings_json, const py::handle& batch) {
        EngineConfig config = engine_config_from_json(settings_json);
        data::Batch converted = to_batch(batch);
        py::gil_scoped_release release;
        return measured_compute_to_json(profile_compute(model, config, converted));
      },
      py::arg("model"), py::arg("settings_json"), py::arg("batch"),
      "Two profiled training steps of the settings' placement on a model of its own (profile_compute, "
      "include/ferry/plan.h): the measured compute as JSON. The steps change the model's weights.");
  module.def(
      "calibrate",
      [](const std::vector<std::string>& nvme, const std::string& nvme_bytes, unsigned repeat,
         const std::string& out, bool verbose) {
        CalibrationOptions options;
        options.nvme_directories = nvme;
        options.nvme_bytes = parse_bytes(nvme_bytes);
        options.repeat = repeat;
        py::gil_scoped_release release;
        const Hardware hardware = calibrate(options, [verbose](const std::string& line) {
          if (!verbose) return;
          py::gil_scoped_acquire acquire;
          py::print(line);
        });
        if (!out.empty()) hardware.save(out);
        return hardware.to_json();
      },
      py::arg("nvme"), py::arg("nvme_bytes"), py::arg("repeat"), py::arg("out"), py::arg("verbose"),
      "Measures this machine as `ferry bench calibrate` does; returns the figures as JSON.");
}

}  // namespace ferry::python

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  namespace python = ferry::python;
  module.doc() = "ferry's compiled core; use the `ferry` package instead.";
  module.attr("__version__") = FERRY_VERSION_STRING;
  python::bind_errors(module);
  python::bind_modules(module);
  python::bind_models(module);
  python::bind_engine(module);
  python::bind_plan(module);
  python::bind_tokenizer(module);
  pybind11::module_ data_module = module.def_submodule("data", "ferry's data layer");
  python::bind_data(data_module);
  pybind11::module_ optim_module =
      module.def_submodule("optim", "ferry's CPU optimizer kernels on tensors");
  python::bind_optim(optim_module);
}
