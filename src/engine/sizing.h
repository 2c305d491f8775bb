#pragma once

// What the engine's modes share about their configuration: validation and the zo2 placement.

#include "ferry/engine.h"

namespace ferry::detail {

// Throws ferry::Error naming the first invalid field and what would be valid.
void validate(const EngineConfig& config);

// Throws BudgetExceeded naming the tier, what it would hold and the shortfall.
void check_budgets(const TierDemand& needed, const EngineConfig& config);

// The residency manager's options for the engine's budgets and directories.
StoreOptions store_options(const EngineConfig& config);

// zo2: device slots that hold blocks' perturbed compute copies (see zo2.cpp).
constexpr std::size_t kZoComputeSlots = 2;

// Where block `block`'s weights live in zo2 mode.
Tier zo_block_home(const ZoConfig& zo, std::int64_t block);
Precision zo_storage(const EngineConfig& config);

}  // namespace ferry::detail
