#include "ferry/fs.h"

#include <dirent.h>
#include <ftw.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "ferry/check.h"

namespace ferry::fs {

bool is_directory(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

bool exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

std::string parent_directory(const std::string& path) {
  size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

void make_directories(const std::string& path) {
  if (path.empty() || is_directory(path)) return;
  make_directories(parent_directory(path));
  if (::mkdir(path.c_str(), 0755) != 0 && errno != EEXIST) {
    throw Error(detail::concat("cannot create directory '", path, "': ", std::strerror(errno)));
  }
}

void remove_tree(const std::string& path) {
  if (!exists(path)) return;
  auto remove_one = [](const char* entry, const struct stat*, int, struct FTW*) {
    return ::remove(entry) == 0 || errno == ENOENT ? 0 : -1;
  };
  if (::nftw(path.c_str(), remove_one, 16, FTW_DEPTH | FTW_PHYS) != 0) {
    throw Error(detail::concat("cannot remove '", path, "': ", std::strerror(errno)));
  }
}

std::vector<std::string> list_directory(const std::string& path) {
  DIR* directory = ::opendir(path.c_str());
  FERRY_CHECK(directory != nullptr, "cannot list directory '", path, "': ", std::strerror(errno));
  std::vector<std::string> names;
  while (dirent* entry = ::readdir(directory)) {
    std::string name = entry->d_name;
    if (name != "." && name != "..") names.push_back(name);
  }
  ::closedir(directory);
  std::sort(names.begin(), names.end());
  return names;
}

std::string make_temp_directory(const std::string& parent, const std::string& prefix) {
  make_directories(parent);
  std::string pattern = parent + "/" + prefix + "XXXXXX";
  FERRY_CHECK(::mkdtemp(pattern.data()) != nullptr, "cannot create a directory under '", parent,
              "': ", std::strerror(errno));
  return pattern;
}

}  // namespace ferry::fs
