"""neoxja's operators for compiled graphs: products torch.compile must call as they are (a ctypes kernel, FBGEMM's
packed weights, a blocked weight found by lookup), defined as `neoxja::<name>` with a CPU kernel and a fake
(meta) one for tracing.

Why not `torch.library.custom_op`: its Python wrapper costs ~20 us per call on the 2-core EPYC (an eager call
of neoxja::skinny_linear took 71-73 us against 45-55 for the kernel it wraps), and a compiled step pays it at
every product it leaves to such an op; an operator defined through `torch.library.Library` and implemented
for the CPU dispatch key costs a few us (0.5-10 us over the kernel in the same measurement). These operators
have no autograd formula: they are for inference, and a call that would need one (grad enabled, an input
that requires grad) is an error, not a silently missing gradient. Imports nothing of neoxja's.
"""

from __future__ import annotations

import threading

import torch

_LIBRARY = None  # the fragment of the neoxja namespace every operator here is defined in (kept alive)
_DEFINED: dict[str, torch._ops.OpOverload] = {}
_LOCK = threading.Lock()  # layers made in two threads at once (a server loading while another model runs)


def define_op(name: str, schema: str, impl, fake) -> torch._ops.OpOverload:
    """`neoxja::name` with `schema` (its arguments and result, e.g. "(Tensor x, int k) -> Tensor"), the CPU
    kernel `impl` and the fake `fake` (same arguments, returns an empty result of the right shape and dtype).
    Defined once per process (later calls return the same operator); call it outside any traced code, as
    registering cannot happen while dynamo traces. The result must not alias an input."""
    global _LIBRARY
    with _LOCK:
        if name not in _DEFINED:
            if _LIBRARY is None:
                _LIBRARY = torch.library.Library("neoxja", "FRAGMENT")

            def kernel(*args):
                if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
                    raise RuntimeError(f"neoxja::{name} has no autograd formula (it is for inference); call it "
                                       f"under torch.no_grad() or with tensors that do not require grad")
                return impl(*args)

            _LIBRARY.define(name + schema)
            _LIBRARY.impl(name, kernel, "CPU")
            torch.library.register_fake(f"neoxja::{name}", fake, lib=_LIBRARY)
            _DEFINED[name] = getattr(torch.ops.neoxja, name).default
        return _DEFINED[name]
