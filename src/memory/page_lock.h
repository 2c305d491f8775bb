#pragma once

#include <cstddef>
#include <string>

namespace ferry::detail {

// Page-locks [base, base + bytes): cudaHostRegister where CUDA and a device are present, else
// mlock. Returns how ("cudaHostRegister", "mlock"), or why it could not, starting "not locked".
std::string lock_pages(void* base, size_t bytes);
void unlock_pages(void* base, size_t bytes, const std::string& how);

}  // namespace ferry::detail
