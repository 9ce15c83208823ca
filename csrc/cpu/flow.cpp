// CPU kernels of flow (see SPEC.md). Not implemented yet: the op runs on the reference
// backend until this file binds its kernels.
#include "vft/bind.h"

namespace vft {
void bind_flow(pybind11::module_& m) { (void)m; }
}  // namespace vft
