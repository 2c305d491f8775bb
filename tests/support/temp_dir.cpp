#include "support/temp_dir.h"

#include <cstdlib>

#include "ferry/fs.h"

namespace ferry::testing {

TempDir::TempDir() {
  const char* root = std::getenv("FERRY_TEST_TMPDIR");
  path_ = fs::make_temp_directory(root != nullptr ? root : "/tmp", "ferry-test-");
}

TempDir::~TempDir() { fs::remove_tree(path_); }

std::string TempDir::subdir(const std::string& name) const {
  std::string dir = path_ + "/" + name;
  fs::make_directories(dir);
  return dir;
}

}  // namespace ferry::testing
