// Default sanitizer options of the "(asan)" test binaries (tests/CMakeLists.txt), read by the
// sanitizer runtimes before main; ASAN_OPTIONS / UBSAN_OPTIONS in the environment still win.

// Note: LeakSanitizer is off: LibTorch's and oneTBB's static state is never freed, and neither is
// instrumented, so every run would "leak". Use-after-free, overflows, double and mismatched frees
// are still caught, in the uninstrumented code's heap use as well (malloc and free are intercepted).
extern "C" const char* __asan_default_options() {
  return "detect_leaks=0:abort_on_error=0:halt_on_error=1";
}

extern "C" const char* __ubsan_default_options() {
  return "print_stacktrace=1:halt_on_error=1";
}
