#pragma once

// Moved to the public ferry/fs.h; kept while work in flight still includes this path.
#include "ferry/fs.h"
