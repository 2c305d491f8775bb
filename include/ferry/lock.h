#pragma once

// Exclusive locks on the directories a job writes: its output directory, every NVMe directory
// and a staged layout. A job holds them for its whole life; a second job on any of them is
// refused at once, with the holder named, instead of both corrupting each other's files.
//
//   ferry::DirectoryLock lock = ferry::DirectoryLock::acquire("/runs/a", "output directory");
//   ...  // until `lock` goes, no other process can take it
//
// Note: the lock is flock(2) on "<directory>/.ferry.lock". The kernel releases it when the
// holder's last descriptor closes, so a process that dies (kill -9, a crash, a lost node) leaves
// no lock behind: the next job simply takes it. The file's contents (the holder's pid, host,
// program and start time) only say who holds it, for the message a refused job prints; they
// never decide anything. The file is never removed: removing a lock file while another process
// waits on it would let two processes hold "the" lock on two different files. Within one
// process the lock is shared: acquiring a directory this process holds already succeeds (the CLI
// holds the NVMe directories for the whole job, and the engine's store takes them again), so two
// engines of one process on one directory are not told apart. A forked child does not share its
// parent's locks. flock works on local filesystems and on NFS (as a whole-file fcntl lock).

#include <memory>
#include <optional>
#include <string>

#include "ferry/check.h"

namespace ferry {

class Env;

inline constexpr const char* kLockFileName = ".ferry.lock";

// Who holds (or last held) a lock, as its lock file says.
struct LockHolder {
  long pid = 0;
  std::string host;
  std::string program;  // the holder's command line, shortened
  std::string started;  // when it took the lock, UTC, ISO 8601

  // "pid 4242 (ferry finetune --out runs/a) on host node1 since 2026-12-03T10:00:00Z"
  std::string describe() const;
};

// A directory another process holds.
class DirectoryBusy : public Error {
 public:
  DirectoryBusy(const std::string& message, std::optional<LockHolder> holder)
      : Error(message), holder_(std::move(holder)) {}
  const std::optional<LockHolder>& holder() const { return holder_; }

 private:
  std::optional<LockHolder> holder_;
};

namespace detail {
struct HeldLock;
}

class DirectoryLock {
 public:
  // Locks `directory` (created when missing). `role` names it in messages ("output directory",
  // "NVMe directory", "staged layout"). Throws DirectoryBusy naming the holder when another
  // process holds it, ferry::Error or IoException when the lock file cannot be made. The lock
  // file is written through `env` (nullptr: Env::posix()).
  static DirectoryLock acquire(const std::string& directory, const std::string& role,
                               Env* env = nullptr);
  // The same for a directory that is replaced whole (an export, swapped in by rename), which
  // cannot hold its own lock file: the lock is the sibling file "<directory>.ferry.lock".
  static DirectoryLock acquire_beside(const std::string& directory, const std::string& role,
                                      Env* env = nullptr);

  DirectoryLock();
  ~DirectoryLock();
  DirectoryLock(DirectoryLock&&) noexcept;
  DirectoryLock& operator=(DirectoryLock&&) noexcept;

  bool held() const { return held_ != nullptr; }
  const std::string& directory() const;
  // The holder an earlier lock file named when that process ended without releasing it (it
  // crashed or was killed): its lock was taken over. Empty after a clean release.
  const std::optional<LockHolder>& previous_holder() const;

 private:
  explicit DirectoryLock(std::shared_ptr<detail::HeldLock> held);
  static DirectoryLock acquire_file(const std::string& path, const std::string& directory,
                                    const std::string& role, Env* env);
  std::shared_ptr<detail::HeldLock> held_;
};

// The holder `directory`'s lock file names; empty when there is none or it was released
// cleanly. Informative only: whether it is still held is what acquire() finds.
std::optional<LockHolder> read_lock_holder(const std::string& directory);

}  // namespace ferry
