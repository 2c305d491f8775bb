// Directory locks (include/ferry/lock.h): flock on "<directory>/.ferry.lock", shared within a
// process, the holder's identity written into the file for the messages of refused jobs.

#include "ferry/lock.h"

#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <ctime>
#include <fstream>
#include <map>
#include <mutex>
#include <sstream>

#include <nlohmann/json.hpp>

#include "ferry/fs.h"
#include "ferry/io.h"

namespace ferry {
namespace detail {

struct HeldLock {
  std::string directory;
  std::unique_ptr<File> file;
  std::optional<LockHolder> previous;
  pid_t pid = 0;  // the process that took it

  ~HeldLock() {
    if (file == nullptr || pid != ::getpid()) return;  // a forked child never held it
    // Empty contents say "released cleanly": a later job then reports no earlier holder.
    (void)::ftruncate(file->buffered_fd(), 0);
    (void)::flock(file->buffered_fd(), LOCK_UN);
  }
};

}  // namespace detail

namespace {

using Json = nlohmann::json;

std::string lock_path(const std::string& directory) { return directory + "/" + kLockFileName; }

// Locks this process holds, by the lock file's device and inode.
struct Registry {
  std::mutex mutex;
  std::map<std::pair<dev_t, ino_t>, std::weak_ptr<detail::HeldLock>> held;
};

Registry& registry() {
  static Registry* registry = new Registry;  // outlives every static DirectoryLock
  return *registry;
}

std::string host_name() {
  char name[256] = {};
  if (::gethostname(name, sizeof name - 1) != 0) return "?";
  return name;
}

std::string command_line() {
  std::ifstream in("/proc/self/cmdline", std::ios::binary);
  std::string text, word;
  while (std::getline(in, word, '\0') && text.size() < 160) {
    const std::size_t slash = text.empty() ? word.find_last_of('/') : std::string::npos;
    text += (text.empty() ? "" : " ") + (slash == std::string::npos ? word : word.substr(slash + 1));
  }
  return text.size() > 160 ? text.substr(0, 157) + "..." : text;
}

std::string utc_now() {
  const std::time_t now = std::time(nullptr);
  std::tm parts{};
  ::gmtime_r(&now, &parts);
  char text[32];
  std::strftime(text, sizeof text, "%Y-%m-%dT%H:%M:%SZ", &parts);
  return text;
}

std::optional<LockHolder> parse_holder(const std::string& text) {
  if (text.empty()) return std::nullopt;
  try {
    const Json json = Json::parse(text);
    LockHolder holder;
    holder.pid = json.value("pid", 0L);
    holder.host = json.value("host", std::string("?"));
    holder.program = json.value("program", std::string());
    holder.started = json.value("started", std::string());
    return holder;
  } catch (const std::exception&) {
    return std::nullopt;  // torn by a crash mid-write, or not ours: say nothing rather than guess
  }
}

std::string read_all(int fd) {
  std::string text;
  char buffer[1024];
  for (off_t offset = 0;;) {
    const ssize_t got = ::pread(fd, buffer, sizeof buffer, offset);
    if (got <= 0) break;
    text.append(buffer, static_cast<std::size_t>(got));
    offset += got;
  }
  return text;
}

}  // namespace

std::string LockHolder::describe() const {
  std::string text = detail::concat("pid ", pid);
  if (!program.empty()) text += " (" + program + ")";
  text += " on host " + host;
  if (!started.empty()) text += " since " + started;
  return text;
}

DirectoryLock::DirectoryLock() = default;
DirectoryLock::DirectoryLock(std::shared_ptr<detail::HeldLock> held) : held_(std::move(held)) {}
DirectoryLock::~DirectoryLock() {
  if (held_ == nullptr) return;
  // Note: the last handle of this process releases the lock, under the registry's mutex, so a
  // concurrent acquire of the same directory either shares this one or takes it afresh.
  std::lock_guard<std::mutex> lock(registry().mutex);
  held_.reset();
}
DirectoryLock::DirectoryLock(DirectoryLock&&) noexcept = default;
DirectoryLock& DirectoryLock::operator=(DirectoryLock&& other) noexcept {
  if (this != &other) {
    DirectoryLock released(std::move(*this));
    held_ = std::move(other.held_);
  }
  return *this;
}

const std::string& DirectoryLock::directory() const {
  static const std::string none;
  return held_ ? held_->directory : none;
}

const std::optional<LockHolder>& DirectoryLock::previous_holder() const {
  static const std::optional<LockHolder> none;
  return held_ ? held_->previous : none;
}

DirectoryLock DirectoryLock::acquire(const std::string& directory, const std::string& role,
                                     Env* env) {
  try {
    fs::make_directories(directory);
  } catch (const Error& error) {
    throw Error(detail::concat("cannot lock ", role, " '", directory, "': ", error.what()));
  }
  return acquire_file(lock_path(directory), directory, role, env);
}

DirectoryLock DirectoryLock::acquire_beside(const std::string& directory, const std::string& role,
                                            Env* env) {
  std::string trimmed = directory;
  while (trimmed.size() > 1 && trimmed.back() == '/') trimmed.pop_back();
  try {
    fs::make_directories(fs::parent_directory(trimmed));
  } catch (const Error& error) {
    throw Error(detail::concat("cannot lock ", role, " '", directory, "': ", error.what()));
  }
  return acquire_file(trimmed + kLockFileName, directory, role, env);
}

DirectoryLock DirectoryLock::acquire_file(const std::string& path, const std::string& directory,
                                          const std::string& role, Env* env_in) {
  Env& env = env_or_posix(env_in);
  Registry& shared = registry();
  for (int attempt = 0;; ++attempt) {
    std::unique_ptr<File> file = env.open(path, OpenMode::kCreate, /*try_direct=*/false);
    struct stat opened {};
    FERRY_CHECK(::fstat(file->buffered_fd(), &opened) == 0, "cannot stat the lock file '", path, "': ",
                std::strerror(errno));
    const auto key = std::make_pair(opened.st_dev, opened.st_ino);
    std::lock_guard<std::mutex> lock(shared.mutex);
    auto found = shared.held.find(key);
    if (found != shared.held.end()) {
      std::shared_ptr<detail::HeldLock> held = found->second.lock();
      if (held != nullptr && held->pid == ::getpid()) return DirectoryLock(std::move(held));
      shared.held.erase(found);  // released, or inherited from the parent across fork
    }
    if (::flock(file->buffered_fd(), LOCK_EX | LOCK_NB) != 0) {
      const int error = errno;
      FERRY_CHECK(error == EWOULDBLOCK || error == EINTR, "cannot lock ", role, " '", directory,
                  "' (flock of ", path, "): ", std::strerror(error),
                  "; give a directory on a filesystem that supports file locks");
      const std::optional<LockHolder> holder = parse_holder(read_all(file->buffered_fd()));
      throw DirectoryBusy(
          detail::concat(role, " '", directory, "' is in use by another ferry process (",
                         holder ? holder->describe() : std::string("which has not written its name yet"),
                         "): two jobs on one directory would overwrite each other's files. Wait for it to "
                         "end, stop it, or give this job another directory"),
          holder);
    }
    // Note: the file locked must still be the one at the path (it is never removed by ferry, but
    // a user may have); otherwise another process could lock the new file meanwhile.
    struct stat now {};
    if (::stat(path.c_str(), &now) != 0 || now.st_dev != opened.st_dev || now.st_ino != opened.st_ino) {
      FERRY_CHECK(attempt < 3, "the lock file '", path, "' keeps being replaced: cannot lock ", role, " '",
                  directory, "'");
      continue;
    }
    auto held = std::make_shared<detail::HeldLock>();
    held->directory = directory;
    held->previous = parse_holder(read_all(file->buffered_fd()));
    held->pid = ::getpid();
    const std::string me = Json{{"pid", static_cast<long>(::getpid())},
                                {"host", host_name()},
                                {"program", command_line()},
                                {"started", utc_now()}}
                               .dump() +
                           "\n";
    file->truncate(0);
    file->write(0, me.data(), me.size());
    held->file = std::move(file);
    shared.held[key] = held;
    return DirectoryLock(std::move(held));
  }
}

std::optional<LockHolder> read_lock_holder(const std::string& directory) {
  std::ifstream in(lock_path(directory), std::ios::binary);
  if (!in.good()) return std::nullopt;
  std::ostringstream text;
  text << in.rdbuf();
  return parse_holder(text.str());
}

}  // namespace ferry
