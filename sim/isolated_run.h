#ifndef SYNOD_SIM_ISOLATED_RUN_H_
#define SYNOD_SIM_ISOLATED_RUN_H_

#include "sim/world.h"

namespace synod::sim {

// Runs one simulation in a child process, so that a SYNOD_CHECK abort inside the core
// (a replica that caught its own broken invariant) fails that run instead of ending the
// sweep. The result's trace_hash and events are not carried back; passed, failure and
// simulated_ms are. A child that dies reports "the process died".
SimResult RunIsolated(const SimOptions& options);

}  // namespace synod::sim

#endif  // SYNOD_SIM_ISOLATED_RUN_H_
