#include "support/temp_dir.h"

#include <cstdlib>
#include <filesystem>
#include <stdexcept>

namespace ferry::testing {

TempDir::TempDir() {
  const char* root = std::getenv("FERRY_TEST_TMPDIR");
  std::filesystem::path base = root != nullptr ? root : std::filesystem::temp_directory_path();
  std::filesystem::create_directories(base);
  std::string pattern = (base / "ferry-test-XXXXXX").string();
  if (mkdtemp(pattern.data()) == nullptr) {
    throw std::runtime_error("mkdtemp failed under " + base.string());
  }
  path_ = pattern;
}

TempDir::~TempDir() {
  std::error_code ignored;
  std::filesystem::remove_all(path_, ignored);
}

std::string TempDir::subdir(const std::string& name) const {
  std::filesystem::path dir = std::filesystem::path(path_) / name;
  std::filesystem::create_directories(dir);
  return dir.string();
}

}  // namespace ferry::testing
