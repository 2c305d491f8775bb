#include <catch2/catch.hpp>

#include "store/extent_allocator.h"

using ferry::detail::ExtentAllocator;

TEST_CASE("extents are placed first fit, 4096-aligned, within the capacity") {
  ExtentAllocator extents(10 * 4096 + 100);
  CHECK(extents.capacity_bytes() == 10 * 4096);
  CHECK(extents.allocate(1) == 0u);
  CHECK(extents.allocate(4097) == 4096u);
  CHECK(extents.allocate(4096) == 3 * 4096u);
  CHECK(extents.used_bytes() == 4 * 4096);
  CHECK_FALSE(extents.allocate(7 * 4096).has_value());
  CHECK(extents.allocate(6 * 4096) == 4 * 4096u);
  CHECK_FALSE(extents.allocate(1).has_value());
}

TEST_CASE("freed extents coalesce with both neighbours") {
  ExtentAllocator extents(8 * 4096);
  for (int i = 0; i < 8; ++i) REQUIRE(extents.allocate(4096) == i * 4096u);
  extents.free(2 * 4096, 4096);
  extents.free(4 * 4096, 4096);
  CHECK(extents.largest_free_bytes() == 4096);
  CHECK_FALSE(extents.allocate(2 * 4096).has_value());  // fragmented
  extents.free(3 * 4096, 4096);
  CHECK(extents.largest_free_bytes() == 3 * 4096);
  CHECK(extents.allocate(3 * 4096) == 2 * 4096u);
  CHECK(extents.used_bytes() == 8 * 4096);
}

TEST_CASE("an empty capacity holds nothing") {
  ExtentAllocator extents(0);
  CHECK_FALSE(extents.allocate(1).has_value());
  CHECK(extents.largest_free_bytes() == 0);
}
