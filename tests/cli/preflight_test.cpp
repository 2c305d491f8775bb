// The checks `ferry finetune` runs before it reads any weight (src/cli/preflight.cpp), on real files.

#include <cstdint>
#include <fstream>
#include <vector>

#include "cli/preflight.h"
#include "support/catch.h"
#include "support/temp_dir.h"

namespace ferry::cli {
namespace {

using Catch::Contains;

void write_tokens(const std::string& path, const std::vector<std::uint16_t>& tokens) {
  std::ofstream out(path, std::ios::binary);
  for (std::uint16_t token : tokens) {
    const char bytes[2] = {static_cast<char>(token & 0xff), static_cast<char>(token >> 8)};
    out.write(bytes, 2);
  }
}

TEST_CASE("a token file's ids are checked against the vocabulary in one pass, naming the first bad one") {
  testing::TempDir dir;
  write_tokens(dir.file("small.bin"), {1, 2, 511, 3});
  check_token_ids(dir.file("small.bin"), 512);
  CHECK_THROWS_WITH(check_token_ids(dir.file("small.bin"), 500),
                    Contains("holds id 511 at token 2 (byte 4) of 4") && Contains("has 500 ids (0 to 499)"));

  // Large enough to be split between threads: the error names the first bad id, not any one.
  std::vector<std::uint16_t> tokens(std::size_t{5} << 20, 7);
  tokens[3'000'001] = 600;
  tokens[4'500'000] = 700;
  write_tokens(dir.file("large.bin"), tokens);
  check_token_ids(dir.file("large.bin"), 1000);
  CHECK_THROWS_WITH(check_token_ids(dir.file("large.bin"), 512), Contains("holds id 600 at token 3000001"));

  std::ofstream(dir.file("empty.bin"));
  check_token_ids(dir.file("empty.bin"), 512);  // the dataset says what is wrong with it
  CHECK_THROWS_WITH(check_token_ids(dir.file("missing.bin"), 512), Contains("cannot open token file"));
}

TEST_CASE("an output directory is checked writable where it will be created") {
  testing::TempDir dir;
  check_writable(dir.file("not/yet/there"), "--export");
  std::ofstream(dir.file("a-file")) << "x";
  CHECK_THROWS_WITH(check_writable(dir.file("a-file/export"), "--export"),
                    Contains("--export '" + dir.file("a-file/export") + "'") && Contains("is not a directory"));
}

}  // namespace
}  // namespace ferry::cli
