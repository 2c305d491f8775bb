#pragma once

#include <string>

#include "ferry/io.h"

namespace ferry::detail {

struct FileDescriptors {
  int direct = -1;    // O_DIRECT, or -1 where the directory refuses it
  int buffered = -1;
};

// Opens the two descriptors a File holds; throws IoException naming the path.
FileDescriptors open_descriptors(const std::string& path, OpenMode mode, bool try_direct);

}  // namespace ferry::detail
