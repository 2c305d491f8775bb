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
// The absolute path with symbolic links resolved (realpath) when `path` exists, else the
// absolute path from the working directory with "." and ".." folded.
std::string absolute_path(const std::string& path);
// `target` as seen from directory `base` ("../nvme1/job"; "." for base itself), both resolved
// with absolute_path first.
std::string relative_path(const std::string& target, const std::string& base);
// `path` when it is absolute, else `base`/`path` ("." gives base).
std::string resolve(const std::string& base, const std::string& path);
// Whether both exist and are the same file or directory (device and inode).
bool same_file(const std::string& a, const std::string& b);

}  // namespace ferry::fs
