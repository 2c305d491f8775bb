// The manifest of a layout kept on NVMe (NvmeLayout), as JSON:
//   {"format": "ferry-nvme-layout-2", "identity": {...}, "metadata": {...}, "live": false,
//    "layout_id": "5f0c...", "directories": [".", "../../nvme1/job"],
//    "bindings": [{"directory_inode": 1234, "file_inode": 5678, "file_birth_ns": 0}, ...],
//    "file_name": "ferry-store.bin", "stripe_bytes": 1048576, "chunk_bytes": 16777216,
//    "bundles": [{"name": "block.0.params", "bytes": 4096, "nvme_offset": 0, "holds_data": true,
//                 "complete": true, "checksum": "9f3c...", "chunks": ["9f3c..."]}, ...]}
// Checksums are hex text: JSON numbers lose 64-bit integers in most readers. Directories are
// relative to the manifest's own directory. "ferry-nvme-layout-1" (absolute directories, no id,
// no chunk checksums) is still read.

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <algorithm>
#include <random>
#include <sstream>

#include <nlohmann/json.hpp>

#include "ferry/check.h"
#include "ferry/fs.h"
#include "ferry/io.h"
#include "ferry/store.h"

namespace ferry {
namespace {

using Json = nlohmann::json;

constexpr const char* kLayoutFormat = "ferry-nvme-layout-2";

std::string hex(std::uint64_t value) {
  char text[17];
  std::snprintf(text, sizeof(text), "%016llx", static_cast<unsigned long long>(value));
  return text;
}

constexpr const char* kLegacyLayoutFormat = "ferry-nvme-layout-1";

std::uint64_t parse_hex(const std::string& text) { return std::stoull(text, nullptr, 16); }

// The inodes of a directory and of the store's file in it; zeros for what does not exist.
LayoutBinding binding_of(const std::string& directory, const std::string& file_name) {
  LayoutBinding binding;
  struct stat info {};
  if (::stat(directory.c_str(), &info) == 0) binding.directory_inode = info.st_ino;
  const std::string file = directory + "/" + file_name;
  struct statx extended {};
  if (::statx(AT_FDCWD, file.c_str(), 0, STATX_INO | STATX_BTIME, &extended) == 0) {
    binding.file_inode = extended.stx_ino;
    if (extended.stx_mask & STATX_BTIME) {
      binding.file_birth_ns = extended.stx_btime.tv_sec * std::int64_t{1000000000} + extended.stx_btime.tv_nsec;
    }
  }
  return binding;
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
    const std::string format = json.value("format", std::string());
    FERRY_CHECK(format == kLayoutFormat || format == kLegacyLayoutFormat, "'", path,
                "' is not an NVMe layout manifest of this ferry: format '", format, "', expected '",
                kLayoutFormat, "'");
    layout.identity = json.at("identity").get<std::map<std::string, std::string>>();
    layout.metadata = json.at("metadata").get<std::map<std::string, std::string>>();
    const std::string here = fs::parent_directory(path);
    for (const std::string& directory : json.at("directories").get<std::vector<std::string>>()) {
      // "." stays as the manifest's path spells it; the others are resolved from there.
      const bool as_is = format == kLegacyLayoutFormat || directory == ".";
      layout.directories.push_back(as_is ? fs::resolve(here, directory)
                                         : fs::absolute_path(fs::resolve(fs::absolute_path(here), directory)));
    }
    if (format == kLayoutFormat) {
      layout.layout_id = json.at("layout_id").get<std::string>();
      for (const Json& item : json.at("bindings")) {
        layout.bindings.push_back({item.at("directory_inode").get<std::uint64_t>(),
                                   item.at("file_inode").get<std::uint64_t>(),
                                   item.at("file_birth_ns").get<std::int64_t>()});
      }
      FERRY_CHECK(json.at("chunk_bytes").get<std::uint64_t>() == kLayoutChunkBytes, "'", path,
                  "' has checksums over chunks of ", json.at("chunk_bytes").get<std::uint64_t>(),
                  " bytes; this ferry uses ", kLayoutChunkBytes, ": stage the layout again");
    }
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
      bundle.checksum = parse_hex(item.at("checksum").get<std::string>());
      if (item.contains("chunks")) {
        for (const Json& chunk : item.at("chunks")) bundle.chunk_checksums.push_back(parse_hex(chunk.get<std::string>()));
      }
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

void write_nvme_layout(const NvmeLayout& layout, const std::string& path, Env* env) {
  Json bundles = Json::array();
  for (const LayoutBundle& bundle : layout.bundles) {
    Json chunks = Json::array();
    for (std::uint64_t chunk : bundle.chunk_checksums) chunks.push_back(hex(chunk));
    bundles.push_back({{"name", bundle.name},
                       {"bytes", bundle.bytes},
                       {"nvme_offset", bundle.nvme_offset},
                       {"holds_data", bundle.holds_data},
                       {"complete", bundle.complete},
                       {"checksum", hex(bundle.checksum)},
                       {"chunks", chunks}});
  }
  const std::string here = fs::parent_directory(path);
  Json directories = Json::array();
  for (const std::string& directory : layout.directories) directories.push_back(fs::relative_path(directory, here));
  Json bindings = Json::array();
  for (const LayoutBinding& binding : layout.bindings) {
    bindings.push_back({{"directory_inode", binding.directory_inode},
                        {"file_inode", binding.file_inode},
                        {"file_birth_ns", binding.file_birth_ns}});
  }
  const Json json = {{"format", kLayoutFormat},       {"identity", layout.identity},
                     {"metadata", layout.metadata},   {"layout_id", layout.layout_id},
                     {"directories", directories},    {"bindings", bindings},
                     {"file_name", layout.file_name}, {"stripe_bytes", layout.stripe_bytes},
                     {"chunk_bytes", kLayoutChunkBytes},
                     {"live", layout.live},           {"bundles", bundles}};
  write_file_durably(env_or_posix(env), path, json.dump(1) + "\n");
}

void bind_nvme_layout(NvmeLayout& layout) {
  std::random_device random;
  layout.layout_id.clear();
  for (int i = 0; i < 4; ++i) {
    char word[9];
    std::snprintf(word, sizeof word, "%08x", static_cast<unsigned>(random()));
    layout.layout_id += word;
  }
  layout.bindings.clear();
  for (const std::string& directory : layout.directories) {
    layout.bindings.push_back(binding_of(directory, layout.file_name));
  }
}

std::string nvme_layout_binding_mismatch(const NvmeLayout& layout) {
  if (layout.layout_id.empty() || layout.bindings.size() != layout.directories.size()) {
    return "it was staged by an earlier ferry and records no identity of its own";
  }
  for (std::size_t i = 0; i < layout.directories.size(); ++i) {
    const LayoutBinding was = layout.bindings[i];
    const LayoutBinding now = binding_of(layout.directories[i], layout.file_name);
    const bool same = was.directory_inode == now.directory_inode && was.file_inode == now.file_inode &&
                      (was.file_birth_ns == 0 || now.file_birth_ns == 0 || was.file_birth_ns == now.file_birth_ns);
    if (!same) {
      return detail::concat("directory '", layout.directories[i], "' (or its ", layout.file_name,
                            ") is not the one layout ", layout.layout_id, " was staged in (inodes ", was.directory_inode,
                            "/", was.file_inode, " recorded, ", now.directory_inode, "/", now.file_inode,
                            " here): it is a copy, or was restored from a backup");
    }
  }
  return "";
}

std::vector<std::uint64_t> chunk_checksums(const void* data, std::uint64_t bytes) {
  std::vector<std::uint64_t> sums;
  const auto* base = static_cast<const unsigned char*>(data);
  for (std::uint64_t offset = 0; offset < bytes; offset += kLayoutChunkBytes) {
    sums.push_back(xxh64(base + offset, static_cast<std::size_t>(std::min(kLayoutChunkBytes, bytes - offset))));
  }
  return sums;
}

}  // namespace ferry
