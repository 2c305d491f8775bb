#pragma once

// Small filesystem helpers on POSIX calls.
//
// Note: ferry avoids std::filesystem. PyTorch's pip wheels export their own copies of
// libstdc++'s std::filesystem symbols from libtorch.so; a program linked against that
// LibTorch binds to them, and std::filesystem::remove_all then jumps through a null pointer
// (seen with PyTorch 2.11 and g++ 13). POSIX calls have no such ambiguity.

#include <string>
#include <vector>

namespace ferry::fs {

bool is_directory(const std::string& path);
bool exists(const std::string& path);
// "a/b/c" → "a/b"; "c" → "."
std::string parent_directory(const std::string& path);
// mkdir -p; throws ferry::Error naming the path and errno.
void make_directories(const std::string& path);
// rm -rf; missing paths are fine. Throws ferry::Error naming what could not be removed.
void remove_tree(const std::string& path);
// Names in a directory, without "." and "..", sorted.
std::vector<std::string> list_directory(const std::string& path);
// Creates a fresh directory "<parent>/<prefix>XXXXXX" and returns its path.
std::string make_temp_directory(const std::string& parent, const std::string& prefix);

}  // namespace ferry::fs
