"""neoxja's operators for compiled graphs: products torch.compile must call as they are (a ctypes kernel, FBGEMM's
packed weights, a blocked weight found by lookup), defined as `neoxja::<name>` with a CPU kernel and a fake
(meta) one for tracing.

Why not `torch.library.custom_op`: its Python wrapper costs ~20 us per call on the 2-core EPYC (an eager call
of neoxja::skinny_linear took 71-73 us against 45-55 for the kernel it wraps), and a compiled step pays it at
every product it leaves to such an op; an operator defined through `torch.library.Library` and implemented
for the CPU dispatch key costs ~5 us. These operators have no autograd formula: they are for inference
(their callers run them under no_grad, or only where autograd is off). Imports nothing of neoxja's.
"""

from __future__ import annotations

import torch

_LIBRARY = None  # the fragment of the neoxja namespace every operator here is defined in (kept alive)
_DEFINED: dict[str, torch._ops.OpOverload] = {}


def define_op(name: str, schema: str, impl, fake) -> torch._ops.OpOverload:
    """`neoxja::name` with `schema` (its arguments and result, e.g. "(Tensor x, int k) -> Tensor"), the CPU
    kernel `impl` and the fake `fake` (same arguments, returns an empty result of the right shape and dtype).
    Defined once per process (later calls return the same operator); call it outside any traced code, as
    registering cannot happen while dynamo traces. The result must not alias an input."""
    global _LIBRARY
    if name not in _DEFINED:
        if _LIBRARY is None:
            _LIBRARY = torch.library.Library("neoxja", "FRAGMENT")
        _LIBRARY.define(name + schema)
        _LIBRARY.impl(name, impl, "CPU")
        torch.library.register_fake(f"neoxja::{name}", fake, lib=_LIBRARY)
        _DEFINED[name] = getattr(torch.ops.neoxja, name).default
    return _DEFINED[name]
