#include "ferry/fs.h"

#include <dirent.h>
#include <ftw.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <climits>
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

namespace {

std::vector<std::string> components(const std::string& path) {
  std::vector<std::string> parts;
  std::size_t start = 0;
  while (start <= path.size()) {
    std::size_t slash = path.find('/', start);
    if (slash == std::string::npos) slash = path.size();
    const std::string part = path.substr(start, slash - start);
    if (part == "..") {
      if (!parts.empty()) parts.pop_back();
    } else if (!part.empty() && part != ".") {
      parts.push_back(part);
    }
    start = slash + 1;
  }
  return parts;
}

std::string from_components(const std::vector<std::string>& parts) {
  std::string path;
  for (const std::string& part : parts) path += "/" + part;
  return path.empty() ? "/" : path;
}

}  // namespace

std::string absolute_path(const std::string& path) {
  char resolved[PATH_MAX];
  if (::realpath(path.c_str(), resolved) != nullptr) return resolved;
  std::string absolute = path;
  if (path.empty() || path[0] != '/') {
    FERRY_CHECK(::getcwd(resolved, sizeof resolved) != nullptr, "cannot read the working directory: ",
                std::strerror(errno));
    absolute = std::string(resolved) + "/" + path;
  }
  return from_components(components(absolute));
}

std::string relative_path(const std::string& target, const std::string& base) {
  const std::vector<std::string> to = components(absolute_path(target));
  const std::vector<std::string> from = components(absolute_path(base));
  std::size_t common = 0;
  while (common < to.size() && common < from.size() && to[common] == from[common]) ++common;
  std::string relative;
  for (std::size_t i = common; i < from.size(); ++i) relative += relative.empty() ? ".." : "/..";
  for (std::size_t i = common; i < to.size(); ++i) relative += (relative.empty() ? "" : "/") + to[i];
  return relative.empty() ? "." : relative;
}

std::string resolve(const std::string& base, const std::string& path) {
  if (!path.empty() && path[0] == '/') return path;
  if (path.empty() || path == ".") return base;
  return base + "/" + path;
}

bool same_file(const std::string& a, const std::string& b) {
  struct stat first, second;
  return ::stat(a.c_str(), &first) == 0 && ::stat(b.c_str(), &second) == 0 &&
         first.st_dev == second.st_dev && first.st_ino == second.st_ino;
}

}  // namespace ferry::fs
