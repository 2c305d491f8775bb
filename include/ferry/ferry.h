#pragma once

// Everything a program that uses ferry needs, in one include (docs/architecture.md lists what
// each header holds). The test-support Env in ferry/testing/io_fault.h is left out: include it where
// faults are injected.

#include "ferry/check.h"
#include "ferry/data.h"
#include "ferry/dtype.h"
#include "ferry/engine.h"
#include "ferry/fs.h"
#include "ferry/io.h"
#include "ferry/job.h"
#include "ferry/memory.h"
#include "ferry/model.h"
#include "ferry/model_config.h"
#include "ferry/optim.h"
#include "ferry/placement.h"
#include "ferry/plan.h"
#include "ferry/safetensors.h"
#include "ferry/stage.h"
#include "ferry/store.h"
#include "ferry/system.h"
#include "ferry/tokenizer.h"
#include "ferry/torch_optim.h"
#include "ferry/version.h"
#include "ferry/zo.h"
