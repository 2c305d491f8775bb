// ferry._C.Tokenizer and the chat templates: the tokenizer layer (ferry/tokenizer.h) for Python.

#include "bindings.h"

#include <optional>
#include <string>
#include <vector>

#include "ferry/tokenizer.h"

namespace ferry::python {
namespace {

using TokenizerHolder = std::shared_ptr<Tokenizer>;

py::object special(const std::optional<SpecialToken>& token) {
  if (!token) return py::none();
  return py::make_tuple(token->text, token->id);
}

std::vector<ChatMessage> to_messages(const py::sequence& messages) {
  std::vector<ChatMessage> out;
  for (const py::handle& message : messages) {
    const auto dict = py::reinterpret_borrow<py::dict>(message);
    out.push_back({py::str(dict["role"]).cast<std::string>(), py::str(dict["content"]).cast<std::string>()});
  }
  return out;
}

}  // namespace

TokenizerHolder hold_tokenizer(std::shared_ptr<const Tokenizer> tokenizer) {
  return std::const_pointer_cast<Tokenizer>(std::move(tokenizer));
}

void bind_tokenizer(py::module_& module) {
  // Note: load_tokenizer hands out shared_ptr<const Tokenizer>; pybind11 holds it as
  // shared_ptr<Tokenizer> and only ever calls const methods.
  py::class_<Tokenizer, TokenizerHolder>(module, "Tokenizer")
      .def("encode",
           [](const Tokenizer& tokenizer, const std::string& text, bool add_special_tokens) {
             py::gil_scoped_release release;
             return add_special_tokens ? tokenizer.encode_with_special_tokens(text) : tokenizer.encode(text);
           },
           py::arg("text"), py::arg("add_special_tokens") = false)
      .def("encode_with_spans",
           [](const Tokenizer& tokenizer, const std::string& text) {
             std::vector<std::int32_t> ids;
             std::vector<TokenSpan> spans;
             tokenizer.encode(text, ids, &spans);
             std::vector<std::pair<std::uint32_t, std::uint32_t>> pairs;
             for (const TokenSpan& span : spans) pairs.emplace_back(span.begin, span.end);
             return py::make_tuple(std::vector<std::int64_t>(ids.begin(), ids.end()), pairs);
           },
           py::arg("text"))
      .def("encode_batch",
           [](const Tokenizer& tokenizer, const std::vector<std::string>& texts) {
             std::vector<std::string_view> views(texts.begin(), texts.end());
             py::gil_scoped_release release;
             return encode_batch(tokenizer, views);
           },
           py::arg("texts"))
      .def("decode", &Tokenizer::decode, py::arg("ids"), py::arg("skip_special_tokens") = false)
      .def("token_to_id", &Tokenizer::token_to_id, py::arg("token"))
      .def("id_to_token", &Tokenizer::id_to_token, py::arg("id"))
      .def_property_readonly("vocab_size", &Tokenizer::vocab_size)
      .def_property_readonly("kind", &Tokenizer::kind)
      .def_property_readonly("bos", [](const Tokenizer& tokenizer) { return special(tokenizer.info().bos); })
      .def_property_readonly("eos", [](const Tokenizer& tokenizer) { return special(tokenizer.info().eos); })
      .def_property_readonly("pad", [](const Tokenizer& tokenizer) { return special(tokenizer.info().pad); })
      .def_property_readonly("unk", [](const Tokenizer& tokenizer) { return special(tokenizer.info().unk); })
      .def_property_readonly("adds_bos", [](const Tokenizer& tokenizer) { return tokenizer.info().adds_bos; })
      .def_property_readonly("adds_eos", [](const Tokenizer& tokenizer) { return tokenizer.info().adds_eos; })
      .def_property_readonly("stop_ids", [](const Tokenizer& tokenizer) { return tokenizer.info().stop_ids; })
      .def_property_readonly("chat_template", [](const Tokenizer& tokenizer) { return tokenizer.info().chat_template; })
      .def_property_readonly("files", [](const Tokenizer& tokenizer) { return tokenizer.info().files; })
      .def(
          "apply_chat_template",
          [](const Tokenizer& tokenizer, const py::sequence& messages, bool add_generation_prompt,
             const std::string& template_name) {
            const ChatTemplate chat = ChatTemplate::for_tokenizer(tokenizer, template_name);
            const RenderedChat rendered = chat.render(to_messages(messages), tokenizer.info(), add_generation_prompt);
            return py::make_tuple(rendered.text, rendered.learned, chat.name(), chat.end_of_turn());
          },
          py::arg("messages"), py::arg("add_generation_prompt") = false, py::arg("template") = "");
  module.def("load_tokenizer", [](const std::string& path) { return hold_tokenizer(load_tokenizer(path)); },
             py::arg("path"));
  module.def("byte_tokenizer", [] { return hold_tokenizer(byte_tokenizer()); });
  module.def("has_tokenizer", &has_tokenizer, py::arg("directory"));
  module.def("chat_template_names", &ChatTemplate::names);
}

}  // namespace ferry::python
