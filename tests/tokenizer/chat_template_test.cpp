// The known chat templates against transformers' own rendering of their Jinja sources
// (fixtures/chat_templates.json, from apply_chat_template in transformers 5.17.0).

#include <catch2/catch.hpp>

#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "ferry/check.h"
#include "ferry/tokenizer.h"
#include "tokenizer/fixture_path.h"

namespace {

using Json = nlohmann::json;
using Catch::Matchers::Contains;

Json chat_fixtures() {
  std::ifstream stream(ferry::testing::tokenizer_fixtures() + "/chat_templates.json");
  REQUIRE(stream.is_open());
  std::stringstream text;
  text << stream.rdbuf();
  return Json::parse(text.str());
}

std::vector<ferry::ChatMessage> messages_of(const Json& conversation) {
  std::vector<ferry::ChatMessage> messages;
  for (const Json& message : conversation) {
    messages.push_back({message["role"].get<std::string>(), message["content"].get<std::string>()});
  }
  return messages;
}

ferry::TokenizerInfo tokens(const Json& render) {
  ferry::TokenizerInfo info;
  if (render["bos_token"].is_string()) info.bos = ferry::SpecialToken{render["bos_token"].get<std::string>(), 1};
  info.eos = ferry::SpecialToken{render["eos_token"].get<std::string>(), 2};
  return info;
}

}  // namespace

TEST_CASE("every known template renders every conversation as transformers renders it") {
  const Json fixtures = chat_fixtures();
  std::size_t compared = 0, refused = 0;
  for (const Json& render : fixtures["renders"]) {
    const ferry::ChatTemplate chat = ferry::ChatTemplate::named(render["template"].get<std::string>());
    const auto messages = messages_of(fixtures["conversations"][render["conversation"].get<std::size_t>()]);
    const bool generation = render["add_generation_prompt"].get<bool>();
    INFO(render.dump());
    if (render.contains("error")) {
      // transformers raised (a system message where the template has none, roles out of turn).
      const std::string message = render["error"].get<std::string>();
      const std::string reason = message.substr(message.find(": ") + 2);
      CHECK_THROWS_WITH(chat.render(messages, tokens(render), generation), Contains(reason));
      ++refused;
      continue;
    }
    CHECK(chat.render(messages, tokens(render), generation).text == render["rendered"].get<std::string>());
    ++compared;
  }
  CHECK(compared >= 40);
  CHECK(refused >= 4);
}

TEST_CASE("a model's chat template is recognised by its source, and an unknown one is refused with the names") {
  const Json fixtures = chat_fixtures();
  for (const auto& [name, source] : fixtures["templates"].items()) {
    const auto recognized = ferry::ChatTemplate::recognize(source.get<std::string>());
    REQUIRE(recognized.has_value());
    CHECK(recognized->name() == name);
    // The same template with its newlines escaped (as some tokenizer_config.json files have it).
    std::string escaped;
    for (char c : source.get<std::string>()) escaped += c == '\n' ? std::string("\\n") : std::string(1, c);
    CHECK(ferry::ChatTemplate::recognize("\n" + escaped + "  ").has_value());
  }
  CHECK_FALSE(ferry::ChatTemplate::recognize("{% for m in messages %}{{ m['content'] }}{% endfor %}").has_value());
  CHECK_THROWS_WITH(ferry::ChatTemplate::named("vicuna"),
                    Contains("unknown chat template 'vicuna'") && Contains("chatml") && Contains("llama3") &&
                        Contains("plain"));
}

TEST_CASE("the learned ranges are each assistant turn and the token that ends it") {
  ferry::TokenizerInfo info;
  info.bos = ferry::SpecialToken{"<s>", 1};
  info.eos = ferry::SpecialToken{"</s>", 2};
  const std::vector<ferry::ChatMessage> conversation = {
      {"system", "Be brief."}, {"user", "Hi"}, {"assistant", "Hello!"}, {"user", "Bye"}, {"assistant", " Bye. "}};
  const auto learned = [&](const std::string& name) {
    const ferry::RenderedChat rendered = ferry::ChatTemplate::named(name).render(conversation, info, false);
    std::vector<std::string> parts;
    for (const auto& [begin, end] : rendered.learned) parts.push_back(rendered.text.substr(begin, end - begin));
    return parts;
  };
  CHECK(learned("chatml") == std::vector<std::string>{"Hello!<|im_end|>", " Bye. <|im_end|>"});
  CHECK(learned("qwen2") == std::vector<std::string>{"Hello!<|im_end|>", " Bye. <|im_end|>"});
  CHECK(learned("llama3") == std::vector<std::string>{"Hello!<|eot_id|>", "Bye.<|eot_id|>"});
  CHECK(learned("llama2") == std::vector<std::string>{" Hello! </s>", " Bye. </s>"});
  CHECK(learned("plain") == std::vector<std::string>{"Hello!</s>", " Bye. </s>"});
  const std::vector<ferry::ChatMessage> no_system(conversation.begin() + 1, conversation.end());
  const ferry::RenderedChat mistral = ferry::ChatTemplate::named("mistral-v0.1").render(no_system, info, false);
  CHECK(mistral.text == "<s>[INST] Hi [/INST]Hello!</s> [INST] Bye [/INST] Bye. </s> ");
  REQUIRE(mistral.learned.size() == 2);
  CHECK(mistral.text.substr(mistral.learned[1].first, mistral.learned[1].second - mistral.learned[1].first) ==
        " Bye. </s>");
  CHECK(ferry::ChatTemplate::named("chatml").end_of_turn() == "<|im_end|>");
  CHECK(ferry::ChatTemplate::named("llama3").end_of_turn() == "<|eot_id|>");
  CHECK(ferry::ChatTemplate::named("llama2").end_of_turn().empty());
  CHECK_THROWS_WITH(ferry::ChatTemplate::named("chatml").render({{"tool", "x"}}, info, false),
                    Contains("message 0 has role 'tool'") && Contains("system, user, assistant"));
}
