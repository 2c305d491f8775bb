// Each family's parts against reference math written out plainly here, in double precision.

#include <cmath>
#include <map>
#include <string>

#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include "ferry/check.h"
#include "ferry/model.h"

// glog, which LibTorch includes, defines a CHECK macro of its own; Catch's must win.
#undef CHECK
#include <catch2/catch.hpp>

using namespace ferry;
using models::ModelConfig;
using models::preset;
using Catch::Matchers::Contains;

namespace {

using Weights = std::map<std::string, torch::Tensor>;

Weights weights_of(const torch::nn::Module& module) {
  Weights weights;
  for (const auto& item : module.named_parameters()) {
    weights[item.key()] = item.value().detach().to(torch::kDouble);
  }
  return weights;
}

bool close(const torch::Tensor& actual, const torch::Tensor& expected, double atol = 1e-5) {
  return torch::allclose(actual.to(torch::kDouble), expected.to(torch::kDouble), 1e-4, atol);
}

double max_error(const torch::Tensor& a, const torch::Tensor& b) {
  return (a.to(torch::kDouble) - b.to(torch::kDouble)).abs().max().item<double>();
}

torch::Tensor layer_norm(const torch::Tensor& x, const Weights& w, const std::string& name,
                         double eps) {
  auto mean = x.mean(-1, true);
  auto variance = (x - mean).pow(2).mean(-1, true);
  return (x - mean) / torch::sqrt(variance + eps) * w.at(name + ".weight") + w.at(name + ".bias");
}

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  return x / torch::sqrt(x.pow(2).mean(-1, true) + eps) * weight;
}

torch::Tensor linear(const torch::Tensor& x, const Weights& w, const std::string& name) {
  torch::Tensor y = x.matmul(w.at(name + ".weight").t());
  auto bias = w.find(name + ".bias");
  return bias == w.end() ? y : y + bias->second;
}

torch::Tensor heads(const torch::Tensor& x, std::int64_t head_dim) {
  return x.view({x.size(0), x.size(1), -1, head_dim}).permute({0, 2, 1, 3});
}

torch::Tensor unheads(const torch::Tensor& x) {
  return x.permute({0, 2, 1, 3}).reshape({x.size(0), x.size(2), -1});
}

// softmax(q.k / sqrt(d)) v over the keys j <= i (and i - j < window), query head h reading kv
// head h / (heads / kv_heads), one score at a time.
torch::Tensor reference_attention(const torch::Tensor& q, const torch::Tensor& k,
                                  const torch::Tensor& v, std::int64_t window = 0) {
  const auto batch = q.size(0), num_heads = q.size(1), seq = q.size(2), dim = q.size(3);
  const auto group = num_heads / k.size(1);
  auto out = torch::zeros_like(q);
  auto qa = q.accessor<double, 4>(), ka = k.accessor<double, 4>(), va = v.accessor<double, 4>();
  auto oa = out.accessor<double, 4>();
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t h = 0; h < num_heads; ++h) {
      const int64_t kv = h / group;
      for (int64_t i = 0; i < seq; ++i) {
        std::vector<double> weights(seq, 0.0);
        double total = 0.0, largest = -1e300;
        for (int64_t j = 0; j <= i; ++j) {
          if (window > 0 && i - j >= window) continue;
          double score = 0.0;
          for (int64_t d = 0; d < dim; ++d) score += qa[b][h][i][d] * ka[b][kv][j][d];
          weights[j] = score / std::sqrt(double(dim));
          largest = std::max(largest, weights[j]);
        }
        for (int64_t j = 0; j <= i; ++j) {
          if (window > 0 && i - j >= window) { weights[j] = 0.0; continue; }
          weights[j] = std::exp(weights[j] - largest);
          total += weights[j];
        }
        for (int64_t j = 0; j <= i; ++j) {
          for (int64_t d = 0; d < dim; ++d) oa[b][h][i][d] += weights[j] / total * va[b][kv][j][d];
        }
      }
    }
  }
  return out;
}

// Rotates each pair (x_i, x_{i + d/2}) at position p by the angle p * inv_freq_i.
torch::Tensor reference_rope(const torch::Tensor& x, const std::vector<double>& inv_freq) {
  auto out = x.clone();
  auto xa = x.accessor<double, 4>();
  auto oa = out.accessor<double, 4>();
  const int64_t half = x.size(3) / 2;
  for (int64_t b = 0; b < x.size(0); ++b)
    for (int64_t h = 0; h < x.size(1); ++h)
      for (int64_t p = 0; p < x.size(2); ++p)
        for (int64_t i = 0; i < half; ++i) {
          const double angle = double(p) * inv_freq[i];
          const double first = xa[b][h][p][i], second = xa[b][h][p][i + half];
          oa[b][h][p][i] = first * std::cos(angle) - second * std::sin(angle);
          oa[b][h][p][i + half] = first * std::sin(angle) + second * std::cos(angle);
        }
  return out;
}

std::vector<double> default_inv_freq(int64_t dim, double theta) {
  std::vector<double> inv_freq;
  for (int64_t i = 0; i < dim / 2; ++i) inv_freq.push_back(std::pow(theta, -2.0 * i / dim));
  return inv_freq;
}

torch::Tensor gelu_tanh(const torch::Tensor& x) {
  return 0.5 * x * (1 + torch::tanh(std::sqrt(2 / M_PI) * (x + 0.044715 * x.pow(3))));
}

torch::Tensor reference_gpt2_block(const torch::Tensor& hidden, const Weights& w,
                                   const ModelConfig& c) {
  auto h = layer_norm(hidden, w, "ln_1", c.norm_eps);
  auto qkv = h.matmul(w.at("attn.c_attn.weight")) + w.at("attn.c_attn.bias");
  auto parts = qkv.split(c.hidden_size, -1);
  auto a = unheads(reference_attention(heads(parts[0], c.head_dim), heads(parts[1], c.head_dim),
                                       heads(parts[2], c.head_dim)));
  auto x = hidden + a.matmul(w.at("attn.c_proj.weight")) + w.at("attn.c_proj.bias");
  h = layer_norm(x, w, "ln_2", c.norm_eps);
  auto m = gelu_tanh(h.matmul(w.at("mlp.c_fc.weight")) + w.at("mlp.c_fc.bias"));
  return x + m.matmul(w.at("mlp.c_proj.weight")) + w.at("mlp.c_proj.bias");
}

torch::Tensor reference_opt_block(const torch::Tensor& hidden, const Weights& w,
                                  const ModelConfig& c) {
  const bool pre = c.do_layer_norm_before;
  auto h = pre ? layer_norm(hidden, w, "self_attn_layer_norm", c.norm_eps) : hidden;
  auto a = unheads(reference_attention(heads(linear(h, w, "self_attn.q_proj"), c.head_dim),
                                       heads(linear(h, w, "self_attn.k_proj"), c.head_dim),
                                       heads(linear(h, w, "self_attn.v_proj"), c.head_dim)));
  auto x = hidden + linear(a, w, "self_attn.out_proj");
  if (!pre) x = layer_norm(x, w, "self_attn_layer_norm", c.norm_eps);
  h = pre ? layer_norm(x, w, "final_layer_norm", c.norm_eps) : x;
  x = x + linear(torch::relu(linear(h, w, "fc1")), w, "fc2");
  return pre ? x : layer_norm(x, w, "final_layer_norm", c.norm_eps);
}

torch::Tensor reference_llama_block(const torch::Tensor& hidden, const Weights& w,
                                    const ModelConfig& c, const std::vector<double>& inv_freq,
                                    int64_t window = 0) {
  auto h = rms_norm(hidden, w.at("input_layernorm.weight"), c.norm_eps);
  auto q = reference_rope(heads(linear(h, w, "self_attn.q_proj"), c.head_dim), inv_freq);
  auto k = reference_rope(heads(linear(h, w, "self_attn.k_proj"), c.head_dim), inv_freq);
  auto v = heads(linear(h, w, "self_attn.v_proj"), c.head_dim);
  auto x = hidden + linear(unheads(reference_attention(q, k, v, window)), w, "self_attn.o_proj");
  h = rms_norm(x, w.at("post_attention_layernorm.weight"), c.norm_eps);
  auto gate = linear(h, w, "mlp.gate_proj");
  return x + linear(gate * torch::sigmoid(gate) * linear(h, w, "mlp.up_proj"), w, "mlp.down_proj");
}

// Random values everywhere, so that zero biases and unit norms cannot hide a mistake.
void randomize(LayeredModel& model, uint64_t seed) {
  torch::manual_seed(seed);
  torch::NoGradGuard no_grad;
  for (auto& parameter : model.parameters()) {
    parameter.copy_(torch::randn_like(parameter) * 0.3);
  }
}

torch::Tensor random_tokens(const ModelConfig& config, int64_t batch, int64_t seq) {
  return torch::randint(0, config.vocab_size, {batch, seq}, torch::kLong);
}

}  // namespace

TEST_CASE("family: parts register exactly the config's parameters, in order", "[family]") {
  ModelConfig post_norm_opt = preset("tiny-opt");
  post_norm_opt.do_layer_norm_before = false;
  ModelConfig untied_gpt2 = preset("tiny-gpt2");
  untied_gpt2.tie_word_embeddings = false;
  for (const ModelConfig& config :
       {preset("tiny-gpt2"), preset("tiny-opt"), preset("tiny-llama"), preset("tiny-qwen2"),
        preset("tiny-mistral"), post_norm_opt, untied_gpt2}) {
    INFO(config.model_type);
    LayeredModel model = models::allocate(config);
    auto check_part = [](const torch::nn::Module& module,
                         const std::vector<models::ParameterSpec>& specs) {
      auto named = module.named_parameters();
      REQUIRE(named.size() == specs.size());
      for (size_t i = 0; i < specs.size(); ++i) {
        CHECK(named[i].key() == specs[i].name);
        CHECK(named[i].value().sizes().vec() == specs[i].shape);
        CHECK(named[i].value().requires_grad());
      }
    };
    check_part(*model.stem(), config.stem_parameters());
    for (const auto& block : model.blocks()) check_part(*block, config.block_parameters());
    check_part(*model.head(), config.head_parameters());
    CHECK(model.parameter_count() == config.parameter_count());
    CHECK(model.num_blocks() == static_cast<size_t>(config.num_layers));
  }
}

TEST_CASE("family: random initialisation follows transformers' scheme", "[family]") {
  ModelConfig config = preset("tiny-gpt2");
  config.num_layers = 8;
  LayeredModel a = models::build(config, 7);
  LayeredModel b = models::build(config, 7);
  LayeredModel c = models::build(config, 8);
  auto pa = a.parameters(), pb = b.parameters(), pc = c.parameters();
  for (size_t i = 0; i < pa.size(); ++i) CHECK(torch::equal(pa[i], pb[i]));
  CHECK_FALSE(torch::equal(pa[0], pc[0]));

  auto block = a.blocks()[0]->named_parameters();
  CHECK(torch::equal(block["ln_1.weight"], torch::ones({64})));
  CHECK(torch::equal(block["attn.c_attn.bias"], torch::zeros({192})));
  const double std_attn = block["attn.c_attn.weight"].std().item<double>();
  const double std_proj = block["mlp.c_proj.weight"].std().item<double>();
  CHECK(std_attn == Approx(0.02).epsilon(0.1));
  CHECK(std_proj == Approx(0.02 / std::sqrt(16.0)).epsilon(0.1));

  LayeredModel opt = models::build(preset("tiny-opt"), 1);
  auto embedding = opt.stem()->named_parameters()["embed_tokens.weight"];
  CHECK(torch::equal(embedding[1], torch::zeros({32})));  // OPT's padding row
  CHECK(embedding[2].abs().sum().item<double>() > 0);
}

TEST_CASE("family: a large tensor is drawn in parallel chunks, the same values on any thread count", "[family]") {
  ModelConfig config = preset("tiny-llama");
  config.num_layers = 1;
  config.vocab_size = 80000;  // an 80000 x 64 embedding: more than 2^22 values, drawn in chunks
  const int threads = at::get_num_threads();
  at::set_num_threads(1);
  LayeredModel serial = models::build(config, 3);
  at::set_num_threads(std::max(2, threads));
  LayeredModel parallel = models::build(config, 3);
  at::set_num_threads(threads);
  const torch::Tensor embedding = serial.stem()->named_parameters()["embed_tokens.weight"];
  CHECK(torch::equal(embedding, parallel.stem()->named_parameters()["embed_tokens.weight"]));
  CHECK(embedding.std().item<double>() == Approx(config.initializer_range).epsilon(0.01));
  // Chunks draw from generators of their own: no chunk repeats the first.
  const torch::Tensor flat = embedding.reshape({-1});
  const std::int64_t chunk = std::int64_t{1} << 22;
  CHECK_FALSE(torch::equal(flat.narrow(0, 0, 1000), flat.narrow(0, chunk, 1000)));
  // The tensors of a tiny model are drawn from the seed's one generator, as torch draws them.
  LayeredModel tiny = models::build(preset("tiny-llama"), 3);
  at::Generator generator = at::detail::createCPUGenerator(3);
  torch::Tensor expected = torch::empty(tiny.stem()->named_parameters()["embed_tokens.weight"].sizes(), torch::kFloat);
  expected.normal_(0.0, preset("tiny-llama").initializer_range, generator);
  if (preset("tiny-llama").pad_token_id >= 0) expected[preset("tiny-llama").pad_token_id].zero_();
  CHECK(torch::equal(tiny.stem()->named_parameters()["embed_tokens.weight"], expected));
}

TEST_CASE("family: a GPT-2 block matches the reference math", "[family]") {
  ModelConfig config = preset("tiny-gpt2");
  LayeredModel model = models::build(config, 0);
  randomize(model, 1);
  auto hidden = torch::randn({2, 5, config.hidden_size});
  auto context = model.make_context(torch::zeros({2, 5}, torch::kLong));
  auto actual = model.blocks()[1]->forward(hidden, context);
  auto expected = reference_gpt2_block(hidden.to(torch::kDouble), weights_of(*model.blocks()[1]), config);
  INFO("max error " << max_error(actual, expected));
  CHECK(close(actual, expected));
}

TEST_CASE("family: OPT blocks (pre- and post-norm) match the reference math", "[family]") {
  for (bool pre_norm : {true, false}) {
    ModelConfig config = preset("tiny-opt");
    config.do_layer_norm_before = pre_norm;
    LayeredModel model = models::build(config, 0);
    randomize(model, 2);
    auto hidden = torch::randn({2, 6, config.hidden_size});
    auto context = model.make_context(torch::zeros({2, 6}, torch::kLong));
    auto actual = model.blocks()[0]->forward(hidden, context);
    auto expected =
        reference_opt_block(hidden.to(torch::kDouble), weights_of(*model.blocks()[0]), config);
    INFO("pre_norm " << pre_norm << " max error " << max_error(actual, expected));
    CHECK(close(actual, expected));
  }
}

TEST_CASE("family: LLaMA and Qwen2 blocks (GQA, RoPE, biases) match the reference math",
          "[family]") {
  for (const char* name : {"tiny-llama", "tiny-qwen2", "tiny-llama3"}) {
    ModelConfig config = preset(name);
    LayeredModel model = models::build(config, 0);
    randomize(model, 3);
    auto hidden = torch::randn({2, 7, config.hidden_size});
    auto context = model.make_context(torch::zeros({2, 7}, torch::kLong));
    auto actual = model.blocks()[0]->forward(hidden, context);
    std::vector<double> inv_freq;
    auto table = rope_inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling);
    for (int64_t i = 0; i < table.size(0); ++i) inv_freq.push_back(table[i].item<double>());
    auto expected = reference_llama_block(hidden.to(torch::kDouble),
                                          weights_of(*model.blocks()[0]), config, inv_freq);
    INFO(name << " max error " << max_error(actual, expected));
    CHECK(close(actual, expected));
  }
}

TEST_CASE("family: RoPE frequencies follow transformers' formulas", "[family]") {
  auto plain = rope_inverse_frequencies(16, 10000.0, {});
  auto expected = default_inv_freq(16, 10000.0);
  for (int64_t i = 0; i < 8; ++i) CHECK(plain[i].item<double>() == Approx(expected[i]).epsilon(1e-6));

  models::RopeScaling linear{"linear", 4.0};
  CHECK(rope_inverse_frequencies(16, 10000.0, linear)[3].item<double>() ==
        Approx(expected[3] / 4).epsilon(1e-6));

  // llama3 with head_dim 128 and theta 500000 as in Llama 3.1, checked against the formula:
  // wavelengths above 8192 / low_freq_factor are divided by the factor, below
  // 8192 / high_freq_factor kept, and in between interpolated with
  // s = (8192 / wavelength - low) / (high - low).
  models::RopeScaling llama3{"llama3", 8.0, 1.0, 4.0, 8192};
  auto scaled = rope_inverse_frequencies(128, 500000.0, llama3);
  auto base = default_inv_freq(128, 500000.0);
  int kept = 0, divided = 0, smoothed = 0;
  for (int64_t i = 0; i < 64; ++i) {
    const double wavelength = 2 * M_PI / base[i];
    double want;
    if (wavelength < 8192.0 / 4.0) {
      want = base[i];
      ++kept;
    } else if (wavelength > 8192.0) {
      want = base[i] / 8.0;
      ++divided;
    } else {
      const double s = (8192.0 / wavelength - 1.0) / (4.0 - 1.0);
      want = (1 - s) * base[i] / 8.0 + s * base[i];
      ++smoothed;
    }
    INFO("frequency " << i);
    CHECK(scaled[i].item<double>() == Approx(want).epsilon(1e-5));
  }
  CHECK(kept > 0);
  CHECK(divided > 0);
  CHECK(smoothed > 0);

  RotaryEmbedding rope(16, 10000.0);
  auto [cos, sin] = rope.cos_sin(5, torch::kCPU, torch::kFloat);
  CHECK(cos.sizes() == torch::IntArrayRef({5, 16}));
  CHECK(cos[3][2].item<double>() == Approx(std::cos(3 * expected[2])).epsilon(1e-6));
  CHECK(sin[3][10].item<double>() == Approx(std::sin(3 * expected[2])).epsilon(1e-6));
  auto [cos_long, sin_long] = rope.cos_sin(300, torch::kCPU, torch::kFloat);
  CHECK(torch::equal(cos_long.narrow(0, 0, 5), cos));
}

TEST_CASE("family: OPT's stem and head (projections, offset positions) match the reference",
          "[family]") {
  ModelConfig config = preset("tiny-opt");  // word_embed_proj_dim 32, hidden 64
  LayeredModel model = models::build(config, 0);
  randomize(model, 4);
  auto tokens = random_tokens(config, 2, 6);
  auto stem = weights_of(*model.stem());
  auto embedded = stem.at("embed_tokens.weight").index({tokens});
  auto hidden = embedded.matmul(stem.at("project_in.weight").t()) +
                stem.at("embed_positions.weight").narrow(0, 2, 6);
  for (const auto& block : model.blocks()) {
    hidden = reference_opt_block(hidden, weights_of(*block), config);
  }
  auto head = weights_of(*model.head());
  auto logits = layer_norm(hidden, head, "final_layer_norm", config.norm_eps)
                    .matmul(head.at("project_out.weight").t())
                    .matmul(stem.at("embed_tokens.weight").t());
  auto actual = model.forward(tokens);
  CHECK(actual.sizes() == torch::IntArrayRef({2, 6, config.vocab_size}));
  INFO("max error " << max_error(actual, logits));
  CHECK(close(actual, logits, 1e-4));
}

TEST_CASE("family: padding does not change the logits of real tokens", "[family]") {
  for (const char* name : {"tiny-gpt2", "tiny-llama", "tiny-opt"}) {
    INFO(name);
    ModelConfig config = preset(name);
    LayeredModel model = models::build(config, 5);
    torch::manual_seed(5);
    auto tokens = random_tokens(config, 1, 5);
    auto alone = model.forward(tokens);
    // Right padding: real tokens first.
    auto padded = torch::cat({tokens, torch::zeros({1, 3}, torch::kLong)}, 1);
    auto mask = torch::cat({torch::ones({1, 5}), torch::zeros({1, 3})}, 1);
    auto right = model.forward(padded, mask);
    CHECK(close(right.narrow(1, 0, 5), alone));
    CHECK(torch::isfinite(right).all().item<bool>());
    if (config.family == models::Family::kOpt) {
      // OPT counts positions from the mask, so left padding changes nothing either.
      auto left = model.forward(torch::cat({torch::zeros({1, 3}, torch::kLong), tokens}, 1),
                                torch::cat({torch::zeros({1, 3}), torch::ones({1, 5})}, 1));
      CHECK(close(left.narrow(1, 3, 5), alone));
    }
  }
}

TEST_CASE("family: Mistral's sliding window limits what a query sees", "[family]") {
  ModelConfig config = preset("tiny-mistral");  // window 8, 4 heads over 1 kv head
  LayeredModel model = models::build(config, 0);
  randomize(model, 6);
  auto hidden = torch::randn({1, 12, config.hidden_size});
  auto context = model.make_context(torch::zeros({1, 12}, torch::kLong));
  auto actual = model.blocks()[0]->forward(hidden, context);
  auto expected =
      reference_llama_block(hidden.to(torch::kDouble), weights_of(*model.blocks()[0]), config,
                            default_inv_freq(config.head_dim, config.rope_theta), 8);
  CHECK(close(actual, expected));
  auto changed = hidden.clone();
  changed[0][0] += 1.0;
  auto again = model.blocks()[0]->forward(changed, context);
  CHECK(torch::equal(again.narrow(1, 8, 4), actual.narrow(1, 8, 4)));
  CHECK_FALSE(torch::equal(again.narrow(1, 7, 1), actual.narrow(1, 7, 1)));
}

TEST_CASE("family: causal-LM and answer-only losses", "[family]") {
  torch::manual_seed(9);
  auto logits = torch::randn({2, 4, 11});
  auto labels = torch::randint(0, 11, {2, 4}, torch::kLong);
  labels[1][2] = kIgnoreIndex;
  double total = 0;
  int count = 0;
  for (int b = 0; b < 2; ++b) {
    for (int t = 0; t + 1 < 4; ++t) {
      const int64_t target = labels[b][t + 1].item<int64_t>();
      if (target == kIgnoreIndex) continue;
      auto row = logits[b][t].to(torch::kDouble);
      total += (torch::logsumexp(row, 0) - row[target]).item<double>();
      ++count;
    }
  }
  CHECK(causal_lm_loss(logits, labels).item<double>() == Approx(total / count).epsilon(1e-5));
  CHECK(causal_lm_loss(logits, torch::full({2, 4}, kIgnoreIndex)).item<double>() == 0.0);

  // Without a gradient, logits past 2^26 per batch go through a sequence group at a time (here:
  // one sequence of 2^25 + 1 logits each); the mean is the one the batch gives at once.
  {
    auto wide = torch::randn({2, 2, (std::int64_t{1} << 25) + 1});
    auto wide_labels = torch::randint(0, wide.size(2), {2, 2}, torch::kLong);
    wide.requires_grad_(true);
    const double at_once = causal_lm_loss(wide, wide_labels).item<double>();
    torch::NoGradGuard no_grad;
    CHECK(causal_lm_loss(wide, wide_labels).item<double>() == Approx(at_once).epsilon(1e-6));
  }

  auto tokens = torch::tensor({{5, 6, 7, 8, 0}}, torch::kLong);
  auto prompt = torch::tensor({{1, 1, 0, 0, 0}}, torch::kBool);
  auto padding = torch::tensor({{1, 1, 1, 1, 0}}, torch::kBool);
  auto answer = answer_only_labels(tokens, prompt, padding);
  CHECK(torch::equal(answer, torch::tensor({{-100, -100, 7, 8, -100}}, torch::kLong)));
  CHECK_THROWS_WITH(answer_only_labels(tokens, torch::zeros({1, 4}, torch::kBool)),
                    Contains("prompt_mask has shape"));

  LayeredModel model = models::build(preset("tiny-llama"), 0);
  auto batch = random_tokens(*model.config(), 2, 6);
  auto loss = model.loss(model.forward(batch), batch);
  loss.backward();
  CHECK(std::log(512.0) == Approx(loss.item<double>()).epsilon(0.1));  // near-uniform at init
  CHECK(model.blocks()[0]->named_parameters()["mlp.up_proj.weight"].grad().defined());
}

TEST_CASE("family: bf16 models track their fp32 originals", "[family]") {
  for (const char* name : {"tiny-gpt2", "tiny-opt", "tiny-qwen2"}) {
    INFO(name);
    LayeredModel model = models::build(preset(name), 11);
    auto tokens = random_tokens(*model.config(), 2, 8);
    auto reference = model.forward(tokens);
    model.to(torch::kCPU, torch::kBFloat16);
    CHECK(model.dtype() == torch::kBFloat16);
    CHECK(model.config()->dtype == DType::kBF16);
    auto logits = model.forward(tokens);
    CHECK(logits.scalar_type() == torch::kBFloat16);
    CHECK(max_error(logits, reference) < 0.05);
  }
}

TEST_CASE("family: weight decay skips biases and norms", "[family]") {
  LayeredModel model = models::build(preset("tiny-qwen2"), 0);
  std::vector<std::string> no_decay;
  for (const auto& item : model.blocks()[0]->named_parameters()) {
    if (is_no_decay(item.key(), item.value())) no_decay.push_back(item.key());
  }
  const std::vector<std::string> expected = {"input_layernorm.weight", "self_attn.q_proj.bias",
                                             "self_attn.k_proj.bias", "self_attn.v_proj.bias",
                                             "post_attention_layernorm.weight"};
  CHECK(no_decay == expected);
}

namespace {

struct TinyStem : Stem {
  TinyStem() { embedding = register_parameter("embedding", torch::randn({16, 8})); }
  torch::Tensor forward(const torch::Tensor& tokens, const StepContext&) override {
    return embedding.index({tokens});
  }
  torch::Tensor token_embedding() const override { return embedding; }
  torch::Tensor embedding;
};

struct TinyBlock : Block {
  TinyBlock() { scale = register_parameter("scale", torch::ones({8})); }
  torch::Tensor forward(const torch::Tensor& hidden, const StepContext& context) override {
    return hidden * scale + context.positions.unsqueeze(-1).to(hidden.scalar_type());
  }
  torch::Tensor scale;
};

struct TinyHead : Head {
  explicit TinyHead(torch::Tensor tied) : tied(std::move(tied)) {}
  torch::Tensor forward(const torch::Tensor& hidden, const StepContext&) override {
    return hidden.matmul(tied.t());
  }
  torch::Tensor tied;
};

}  // namespace

TEST_CASE("family: a model assembled from user modules runs", "[family]") {
  auto stem = std::make_shared<TinyStem>();
  LayeredModel model(stem, {std::make_shared<TinyBlock>(), std::make_shared<TinyBlock>()},
                     std::make_shared<TinyHead>(stem->embedding));
  auto tokens = torch::tensor({{1, 2, 3}}, torch::kLong);
  auto logits = model.forward(tokens);
  auto hidden = stem->embedding.index({tokens}) + 2 * torch::arange(3).view({1, 3, 1});
  // (e + p) + p rounds differently from e + 2p: a random logit near zero fails a relative check
  // alone, so the tolerance has an absolute part of fp32 rounding's size for values of order 10.
  CHECK(torch::allclose(logits, hidden.matmul(stem->embedding.t()), 1e-5, 1e-5));
  CHECK(model.parameter_count() == 16 * 8 + 2 * 8);
  CHECK_FALSE(model.config().has_value());
  CHECK_THROWS_WITH(models::initialize(model, 0), Contains("assembled by hand"));
}
