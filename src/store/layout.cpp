// The manifest of a layout kept on NVMe (NvmeLayout), as JSON:
//   {"format": "ferry-nvme-layout-1", "identity": {...}, "metadata": {...}, "live": false,
//    "directories": [...], "file_name": "ferry-store.bin", "stripe_bytes": 1048576,
//    "bundles": [{"name": "block.0.params", "bytes": 4096, "nvme_offset": 0, "holds_data": true,
//                 "complete": true, "checksum": "9f3c..."}, ...]}
// Checksums are hex text: JSON numbers lose 64-bit integers in most readers.

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "ferry/check.h"
#include "ferry/fs.h"
#include "ferry/store.h"

namespace ferry {
namespace {

using Json = nlohmann::json;

constexpr const char* kLayoutFormat = "ferry-nvme-layout-1";

std::string hex(std::uint64_t value) {
  char text[17];
  std::snprintf(text, sizeof(text), "%016llx", static_cast<unsigned long long>(value));
  return text;
}

void sync_path(const std::string& path, bool directory) {
  int fd = ::open(path.c_str(), (directory ? O_RDONLY | O_DIRECTORY : O_RDONLY) | O_CLOEXEC);
  FERRY_CHECK(fd >= 0, "cannot open '", path, "' to sync it: ", std::strerror(errno));
  int result = directory ? ::fsync(fd) : ::fdatasync(fd);
  int error = errno;
  ::close(fd);
  FERRY_CHECK(result == 0, "syncing '", path, "' failed: ", std::strerror(error));
}

}  // namespace

const LayoutBundle* NvmeLayout::find(const std::string& name) const {
  for (const LayoutBundle& bundle : bundles) {
    if (bundle.name == name) return &bundle;
  }
  return nullptr;
}

NvmeLayout read_nvme_layout(const std::string& path) {
  std::ifstream in(path);
  FERRY_CHECK(in.good(), "cannot read the NVMe layout manifest '", path, "': ", std::strerror(errno));
  std::stringstream text;
  text << in.rdbuf();
  NvmeLayout layout;
  try {
    const Json json = Json::parse(text.str());
    FERRY_CHECK(json.value("format", std::string()) == kLayoutFormat, "'", path,
                "' is not an NVMe layout manifest of this ferry: format '",
                json.value("format", std::string()), "', expected '", kLayoutFormat, "'");
    layout.identity = json.at("identity").get<std::map<std::string, std::string>>();
    layout.metadata = json.at("metadata").get<std::map<std::string, std::string>>();
    layout.directories = json.at("directories").get<std::vector<std::string>>();
    layout.file_name = json.at("file_name").get<std::string>();
    layout.stripe_bytes = json.at("stripe_bytes").get<std::uint64_t>();
    layout.live = json.at("live").get<bool>();
    for (const Json& item : json.at("bundles")) {
      LayoutBundle bundle;
      bundle.name = item.at("name").get<std::string>();
      bundle.bytes = item.at("bytes").get<std::uint64_t>();
      bundle.nvme_offset = item.at("nvme_offset").get<std::uint64_t>();
      bundle.holds_data = item.at("holds_data").get<bool>();
      bundle.complete = item.at("complete").get<bool>();
      bundle.checksum = std::stoull(item.at("checksum").get<std::string>(), nullptr, 16);
      layout.bundles.push_back(std::move(bundle));
    }
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    throw Error(detail::concat("the NVMe layout manifest '", path, "' is corrupt: ", e.what(),
                               "; stage the layout again"));
  }
  return layout;
}

void write_nvme_layout(const NvmeLayout& layout, const std::string& path) {
  Json bundles = Json::array();
  for (const LayoutBundle& bundle : layout.bundles) {
    bundles.push_back({{"name", bundle.name},
                       {"bytes", bundle.bytes},
                       {"nvme_offset", bundle.nvme_offset},
                       {"holds_data", bundle.holds_data},
                       {"complete", bundle.complete},
                       {"checksum", hex(bundle.checksum)}});
  }
  const Json json = {{"format", kLayoutFormat},       {"identity", layout.identity},
                     {"metadata", layout.metadata},   {"directories", layout.directories},
                     {"file_name", layout.file_name}, {"stripe_bytes", layout.stripe_bytes},
                     {"live", layout.live},           {"bundles", bundles}};
  const std::string temporary = path + ".tmp";
  {
    std::ofstream out(temporary, std::ios::trunc);
    out << json.dump(1) << "\n";
    out.close();
    FERRY_CHECK(out.good(), "cannot write the NVMe layout manifest '", temporary, "': ",
                std::strerror(errno));
  }
  sync_path(temporary, false);
  FERRY_CHECK(::rename(temporary.c_str(), path.c_str()) == 0, "cannot rename '", temporary,
              "' to '", path, "': ", std::strerror(errno));
  sync_path(fs::parent_directory(path), true);
}

}  // namespace ferry
