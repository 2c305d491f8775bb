#include <ferry/ferry.h>
#include <iostream>
int main() {
  ferry::EngineConfig config;
  config.mode = ferry::Mode::kZeroOffload;
  ferry::Engine engine(ferry::models::build(ferry::models::preset("tiny-llama"), 1), config);
  std::cout << "ferry " << FERRY_VERSION_STRING << " engine with " << engine.parameter_count() << " parameters\n";
}
