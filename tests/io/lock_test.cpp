// Directory locks: another process is refused with the holder named, a dead holder's lock is
// taken over, one process shares its own, and a clean release says so.

#include <catch2/catch.hpp>

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>

#include "ferry/fs.h"
#include "ferry/lock.h"
#include "support/temp_dir.h"

using namespace ferry;
using ferry::testing::TempDir;

namespace {

// Runs `child` in a forked process and returns its exit status (or 128 + the signal).
template <typename F>
int in_child(F child) {
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    int status = 99;
    try {
      status = child();
    } catch (...) {
      status = 98;
    }
    ::_exit(status);
  }
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

}  // namespace

TEST_CASE("a second process is refused a locked directory, with the holder named") {
  TempDir dir;
  const std::string out = dir.subdir("run");
  DirectoryLock lock = DirectoryLock::acquire(out, "output directory");
  REQUIRE(lock.held());
  CHECK_FALSE(lock.previous_holder().has_value());
  const std::optional<LockHolder> holder = read_lock_holder(out);
  REQUIRE(holder.has_value());
  CHECK(holder->pid == ::getpid());
  CHECK_FALSE(holder->host.empty());

  const int status = in_child([&] {
    try {
      DirectoryLock::acquire(out, "output directory");
      return 1;  // taken: wrong
    } catch (const DirectoryBusy& busy) {
      const std::string message = busy.what();
      const bool named = message.find("output directory '" + out + "' is in use by another ferry process") !=
                             std::string::npos &&
                         message.find("pid " + std::to_string(::getppid())) != std::string::npos &&
                         busy.holder() && busy.holder()->pid == ::getppid();
      return named ? 0 : 2;
    }
  });
  CHECK(status == 0);

  // The same process shares its own lock (the CLI's and the engine's store on one directory).
  DirectoryLock again = DirectoryLock::acquire(out, "NVMe directory");
  CHECK(again.held());
}

TEST_CASE("the lock of a process that died is taken over, and its name reported") {
  TempDir dir;
  const std::string nvme = dir.subdir("nvme");
  int ready[2];
  REQUIRE(::pipe(ready) == 0);
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    ::close(ready[0]);
    try {
      DirectoryLock lock = DirectoryLock::acquire(nvme, "NVMe directory");
      (void)!::write(ready[1], "x", 1);
      ::pause();  // until killed, holding the lock
    } catch (...) {
    }
    ::_exit(1);
  }
  ::close(ready[1]);
  char byte = 0;
  REQUIRE(::read(ready[0], &byte, 1) == 1);
  ::close(ready[0]);
  CHECK_THROWS_AS(DirectoryLock::acquire(nvme, "NVMe directory"), DirectoryBusy);

  ::kill(pid, SIGKILL);
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  DirectoryLock taken = DirectoryLock::acquire(nvme, "NVMe directory");
  REQUIRE(taken.previous_holder().has_value());
  CHECK(taken.previous_holder()->pid == pid);
  CHECK(read_lock_holder(nvme)->pid == ::getpid());
}

TEST_CASE("a clean release leaves no holder behind, and the lock file stays") {
  TempDir dir;
  const std::string out = dir.subdir("run");
  { DirectoryLock lock = DirectoryLock::acquire(out, "output directory"); }
  CHECK(fs::exists(out + "/" + kLockFileName));
  CHECK_FALSE(read_lock_holder(out).has_value());
  DirectoryLock lock = DirectoryLock::acquire(out, "output directory");
  CHECK_FALSE(lock.previous_holder().has_value());
  CHECK(in_child([&] {
          try {
            DirectoryLock::acquire(out, "output directory");
            return 1;
          } catch (const DirectoryBusy&) {
            return 0;
          }
        }) == 0);
  lock = DirectoryLock();
  CHECK(in_child([&] {
          DirectoryLock::acquire(out, "output directory");
          return 0;
        }) == 0);
}

TEST_CASE("a directory replaced whole is locked beside it") {
  TempDir dir;
  const std::string export_dir = dir.file("export");
  DirectoryLock lock = DirectoryLock::acquire_beside(export_dir, "export directory");
  CHECK(fs::exists(export_dir + kLockFileName));
  CHECK_FALSE(fs::exists(export_dir));
  CHECK(in_child([&] {
          try {
            DirectoryLock::acquire_beside(export_dir + "/", "export directory");
            return 1;
          } catch (const DirectoryBusy& busy) {
            return std::string(busy.what()).find("export directory") != std::string::npos ? 0 : 2;
          }
        }) == 0);
}
