#pragma once

// Note: c10's logging header (pulled in by every ATen header) defines a CHECK macro of its
// own, glog's or c10's. Whichever comes last wins, and a test file that includes Catch2
// first and then ATen silently turns every CHECK into an abort that Catch2 never sees. Test
// files that use LibTorch include this header instead of <catch2/catch.hpp>: c10's CHECK is
// defined once here and replaced by Catch2's, and c10's include guard keeps it out later.

#include <c10/util/Logging.h>
#undef CHECK
#include <catch2/catch.hpp>
