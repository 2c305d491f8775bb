#pragma once

#include <string>

namespace ferry::testing {

// A fresh directory on a real disk, removed with its contents on destruction. It lives under
// $FERRY_TEST_TMPDIR (the build tree, set by CTest) so that O_DIRECT works, else under /tmp.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const std::string& path() const { return path_; }
  std::string file(const std::string& name) const { return path_ + "/" + name; }
  std::string subdir(const std::string& name) const;  // created on first use

 private:
  std::string path_;
};

}  // namespace ferry::testing
