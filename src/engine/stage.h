#pragma once

// What the engine's set-up and `ferry stage` (engine/stage.cpp) share about a staged NVMe layout.
// See docs/stage.md.

#include <map>
#include <string>
#include <vector>

#include "engine/parts.h"
#include "ferry/engine.h"
#include "ferry/lock.h"
#include "ferry/store.h"

namespace ferry::detail {

// The manifest of the staged layout whose first NVMe directory is `dir`.
std::string stage_manifest_path(const std::string& dir);

// What a layout is made for, from the job's settings and the model's parts (names, sizes and
// parameter shapes): an engine adopts a layout only when every key matches.
std::map<std::string, std::string> stage_identity(const std::vector<Part>& parts,
                                                  const EngineConfig& config);

// Note: a part whose parameters are not at home on NVMe (fuyou's stem and head, its host blocks)
// would have nothing on NVMe the engine could start it from in fp32 precision. Staging writes its
// parameters, in the compute dtype, into the part's gradients bundle: that bundle is on NVMe in
// every part, has exactly the size, and its contents are never read before backward overwrites
// them. The engine reads this seed once at set-up, so the layout stays exactly the engine's own.
bool needs_seed(const PartPlacement& home);

// For an engine given config.staged: locks the layout (`lock` holds it; another process's job on
// it is refused, naming the holder), reads the manifest and checks it against the settings known
// before the model is described (the mode, the NVMe directories, that staging finished, that it
// is the layout it was staged as and not a copy, and that no earlier run updated it). Fills
// config.nvme_directories from the manifest when empty. Throws ferry::Error with the reason and
// the fix.
NvmeLayout open_staged_layout(EngineConfig& config, DirectoryLock& lock);
// Checks the layout was made for these parts and settings (stage_identity), naming what differs.
void check_staged_layout(const NvmeLayout& layout, const std::vector<Part>& parts,
                         const EngineConfig& config);
// Reads the layout's chunks that config.verify asks for (auto: sampled) and compares them with
// their checksums; a mismatch throws naming the bundle, the byte range and the tensors in it.
void verify_staged_layout(const NvmeLayout& layout, const std::vector<Part>& parts,
                          const EngineConfig& config);
// Adopts bundle `spec` at the offset the layout records for it.
BundleId adopt_staged(Store& store, const NvmeLayout& layout, const BundleSpec& spec);
// Reads part's seed (its parameters in `dtype`) from its gradients bundle, through host memory.
torch::Tensor read_seed(Store& store, const Part& part, torch::ScalarType dtype);
// Records in the manifest that the engine now updates the layout in place (NvmeLayout::live).
void mark_staged_live(NvmeLayout layout, const std::string& dir, Env* env);

}  // namespace ferry::detail
