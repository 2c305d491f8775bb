// A layout kept on NVMe: the checksum, placing extents at recorded offsets, a store adopting the
// bundles an earlier store wrote, and the manifest's round trip and errors.

#include <cstring>
#include <fstream>

#include <torch/types.h>

#include "ferry/store.h"
#include "store/extent_allocator.h"
#include "support/random_bytes.h"
#include "support/catch.h"
#include "support/temp_dir.h"

using namespace ferry;
using ferry::testing::TempDir;
using Catch::Matchers::Contains;

namespace {

constexpr std::uint64_t kMiB = std::uint64_t{1} << 20;

StoreOptions options_in(const TempDir& dir) {
  StoreOptions options;
  options.host_budget_bytes = 4 * kMiB;
  options.nvme_directories = {dir.subdir("nvme0"), dir.subdir("nvme1")};
  options.nvme_budget_bytes = 16 * kMiB;
  options.stripe_bytes = 64 << 10;
  return options;
}

std::uint64_t text_hash(const char* text, std::uint64_t seed = 0) {
  return xxh64(text, std::strlen(text), seed);
}

}  // namespace

TEST_CASE("xxh64 equals the reference implementation's vectors", "[store][layout]") {
  CHECK(text_hash("") == 0xEF46DB3751D8E999ULL);
  CHECK(text_hash("", 1) == 0xD5AFBA1336A3BE4BULL);
  CHECK(text_hash("a") == 0xD24EC4F1A98C6E5BULL);
  CHECK(text_hash("abc") == 0x44BC2CF5AD770999ULL);
  CHECK(text_hash("asdf") == 0x415872F599CEA71EULL);
  CHECK(text_hash("Call me Ishmael.") == 0x6D04390FC9D61A90ULL);
  // 39 bytes: one 32-byte stripe, then 8-, 4- and 1-byte tails.
  CHECK(text_hash("Nobody inspects the spammish repetition") == 0xFBCEA83C8A378BF1ULL);
}

TEST_CASE("the extent allocator places an extent at a given offset only where it is free",
          "[store][layout]") {
  ferry::detail::ExtentAllocator extents(64 * 4096);
  CHECK(extents.allocate_at(8 * 4096, 4096 * 2));
  CHECK_FALSE(extents.allocate_at(9 * 4096, 4096));   // taken
  CHECK_FALSE(extents.allocate_at(100, 4096));        // not aligned
  CHECK_FALSE(extents.allocate_at(63 * 4096, 8192));  // past the capacity
  CHECK(extents.allocate(8 * 4096) == std::optional<std::uint64_t>(0));
  CHECK(extents.allocate(4096) == std::optional<std::uint64_t>(10 * 4096));
  CHECK(extents.used_bytes() == 11 * 4096);
  extents.free(8 * 4096, 8192);
  CHECK(extents.allocate_at(8 * 4096, 4096));
}

TEST_CASE("a store adopts the bundles an earlier store left in its NVMe file", "[store][layout]") {
  TempDir dir;
  const torch::Tensor contents = random_bytes(300000, 1);
  std::uint64_t written_at = 0, zeros_at = 0;
  {
    Store store(options_in(dir));
    const BundleId zeros = store.add({"zeros", 5000, Tier::kNvme});
    const BundleId data = store.add({"data", 300000, Tier::kNvme});
    store.allocate(data, Tier::kHost);
    store.tensor(data, Tier::kHost).copy_(contents);
    store.write_back(data, Tier::kHost, Tier::kNvme).wait();
    store.sync_nvme();
    written_at = store.nvme_offset(data);
    zeros_at = store.nvme_offset(zeros);
    CHECK(zeros_at == 0);
    CHECK(written_at == 8192);
  }
  Store store(options_in(dir));
  const BundleId data = store.adopt({"data", 300000, Tier::kNvme}, written_at, /*holds_data=*/true);
  const BundleId zeros = store.adopt({"zeros", 5000, Tier::kNvme}, zeros_at, /*holds_data=*/false);
  CHECK(store.state(data, Tier::kNvme) == CopyState::kReady);
  store.fetch(data, Tier::kHost).wait();
  CHECK(store.tensor(data, Tier::kHost).equal(contents));
  store.fetch(zeros, Tier::kHost).wait();
  CHECK(store.tensor(zeros, Tier::kHost).count_nonzero().item<std::int64_t>() == 0);
  CHECK(store.stats().transfers[2][1].bytes == 300000 / 4096 * 4096 + 4096);  // zeros move nothing

  CHECK_THROWS_WITH(store.adopt({"overlap", 4096, Tier::kNvme}, written_at + 4096, true),
                    Contains("cannot adopt bundle 'overlap' at NVMe offset") &&
                        Contains("overlaps another bundle"));
  CHECK_THROWS_WITH(store.adopt({"host", 4096, Tier::kHost}, 0, true),
                    Contains("only a bundle at home on nvme can be adopted"));
  // A fresh bundle takes the first free extent, after the adopted ones.
  CHECK(store.nvme_offset(store.add({"next", 4096, Tier::kNvme})) == written_at + 303104);
}

TEST_CASE("a layout manifest round-trips and a corrupt one names the file", "[store][layout]") {
  TempDir dir;
  NvmeLayout layout;
  layout.identity = {{"mode", "fuyou"}, {"precision", "bf16"}};
  layout.metadata = {{"model_config", "{\"a\": 1}"}};
  layout.directories = {"/mnt/a", "/mnt/b"};
  layout.file_name = "ferry-store.bin";
  layout.stripe_bytes = 1 << 20;
  layout.live = true;
  layout.layout_id = "0123456789abcdef0123456789abcdef";
  layout.bindings = {{11, 12, 13}, {21, 22, 0}};
  layout.bundles = {{"block.0.params", 12345, 0, true, true, 0xFEDCBA9876543210ULL, {0x1234, 0xFFFFFFFFFFFFFFFFULL}},
                    {"block.0.state0", 4096, 16384, false, true, 0},
                    {"block.1.params", 12345, 20480, true, false, 0}};
  const std::string path = dir.file("layout.json");
  write_nvme_layout(layout, path);
  const NvmeLayout read = read_nvme_layout(path);
  CHECK(read.identity == layout.identity);
  CHECK(read.metadata == layout.metadata);
  CHECK(read.directories == layout.directories);  // recorded relative to the manifest, read back resolved
  CHECK(read.layout_id == layout.layout_id);
  REQUIRE(read.bindings.size() == 2);
  CHECK(read.bindings[1].file_inode == 22);
  CHECK(read.bindings[0].file_birth_ns == 13);
  CHECK(read.bundles.at(0).chunk_checksums == std::vector<std::uint64_t>{0x1234, 0xFFFFFFFFFFFFFFFFULL});
  // Bound to other inodes than these (the test's), it reads as a copy.
  CHECK_THAT(nvme_layout_binding_mismatch(read), Contains("is not the one layout " + layout.layout_id));
  NvmeLayout here = read;
  here.directories = {dir.subdir("a")};
  here.bindings.clear();
  CHECK_THAT(nvme_layout_binding_mismatch(here), Contains("records no identity"));
  bind_nvme_layout(here);
  CHECK(nvme_layout_binding_mismatch(here).empty());
  CHECK(here.layout_id.size() == 32);
  CHECK(read.file_name == layout.file_name);
  CHECK(read.stripe_bytes == layout.stripe_bytes);
  CHECK(read.live);
  REQUIRE(read.bundles.size() == 3);
  CHECK(read.bundles[0].checksum == 0xFEDCBA9876543210ULL);
  CHECK(read.bundles[1].nvme_offset == 16384);
  CHECK_FALSE(read.bundles[1].holds_data);
  CHECK_FALSE(read.bundles[2].complete);
  CHECK(read.find("block.1.params") != nullptr);
  CHECK(read.find("block.2.params") == nullptr);

  std::ofstream(path) << "{\"format\": \"ferry-nvme-layout-1\", \"bundles\": [";
  CHECK_THROWS_WITH(read_nvme_layout(path), Contains(path) && Contains("is corrupt"));
  std::ofstream(path) << "{\"format\": \"something-else\"}";
  CHECK_THROWS_WITH(read_nvme_layout(path), Contains("is not an NVMe layout manifest"));
  CHECK_THROWS_WITH(read_nvme_layout(dir.file("missing.json")), Contains("cannot read"));
}
