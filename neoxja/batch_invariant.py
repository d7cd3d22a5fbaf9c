"""Row-count-invariant products: `make_batch_invariant(model)` makes what a row gets from the model independent
of how many other rows share the call (the serving engine's decode steps, generate()'s batches).

Why: the CPU kernels behind F.linear pick their algorithm by the number of rows M. Measured here (float32,
every weight shape of the bundled model and of the 2.7B width): MKL's F.linear gives a row different bits
at M=1 (its matrix-vector path) than at M>=2, and different bits again above M=10..15; the skinny-product
kernels (batched products over weight slices) agree with it on 2..10 only. oneDNN's linear gives a row the
same bits for every M >= 2 in float32 (checked for M = 2..69 and at any position of the row in the batch, and
on a Xeon with AMX up to M = 512). In bfloat16 on that Xeon it does so for M = 2..32 only: from 33 rows, with
2,560 or more inputs, oneDNN blocks the sum differently. So bfloat16 and float16 products are computed in
blocks of at most 32 rows (BLOCK_ROWS), each block as any call of 2..32 rows would compute it.

So the transform replaces each float nn.Linear (and subclasses such as model.Linear; not the quantized
modules) by `RowInvariantLinear`, which shares its weight and bias (ties survive) and computes inference
products on the CPU with oneDNN's linear, a single row as two equal ones. The attention of the cached path
is made row- and cache-length-invariant in neoxja.model (_cached_attention).

Holds: float32 (and bfloat16, same kernel; on a CPU where oneDNN has no bfloat16 kernel, AVX2-only ones,
bfloat16 products are computed in float32 and rounded once, with a float32 copy of the weight when prepacking)
on the CPU, inference (no autograd). Not claimed: CUDA (cuBLAS
makes no such promise; the modules fall back to F.linear there), the int8/int4 quantized modules, and
training (autograd falls back to F.linear). Cost: see benchmarks/bench_overhead.py (--invariance).

Prepacking: oneDNN's linear reorders a plain weight into its blocked layout at every call, which costs as much
as the product at one or two rows. `make_batch_invariant(model, prepack=True)` keeps a blocked copy of each
weight (neoxja.kernels.blocked_copy: the same bits, measured equal) and uses it while the weight is unchanged
(its version counter is checked per call; a changed weight is repacked), compiled steps included. The copy doubles the
weights' memory; prepack="auto" (the default) packs when the model's weights take at most a quarter of this
machine's memory. Measured on a 2-core AMD EPYC (AVX2): 256x8000 at two rows 1.51 -> 0.31 ms, 2560x10240 at
16 rows 27.0 -> 19.4 ms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from neoxja._ops import define_op
from neoxja.kernels import (BlockedCopyLinear, blocked_copy, linear_fake, onednn_dtypes, onednn_linear_available,
                            pack_fits, release_blocked_copies)


BLOCK_ROWS = {torch.bfloat16: 32, torch.float16: 32}  # rows per oneDNN call at most, where M changes the bits


def _onednn_rows(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (rows, in) @ w.T + bias through oneDNN's linear, a single row as two equal ones, at most
    BLOCK_ROWS[dtype] rows per call; (rows, out). In a dtype oneDNN does not run in on this CPU (bfloat16 on
    an AVX2-only one), the product is float32's, rounded to x's dtype once: as row-invariant as float32's."""
    if x.dtype not in onednn_dtypes():
        bias = None if bias is None else bias.float()
        return _onednn_rows(x.float(), w.float(), bias).to(x.dtype)  # (rows, out)
    rows = x.shape[0]
    block = BLOCK_ROWS.get(x.dtype)
    if block is not None and rows > block:
        return torch.cat([_onednn_rows(x[i:i + block], w, bias) for i in range(0, rows, block)])  # (rows, out)
    if rows == 1:
        x = x.expand(2, x.shape[1])  # one row computed as two: oneDNN's M=1 path differs
    y = torch.ops.mkldnn._linear_pointwise(x.contiguous(), w.contiguous(), bias, "none", [None], "")
    return y[:rows]


_ROW_INVARIANT_OP = None  # the custom op, once registered (RowInvariantLinear.wrap registers it)


def _row_invariant_op():
    """RowInvariantLinear's product as a custom op (registered on first use, not at import), so that
    torch.compile calls this very kernel as an opaque step instead of lowering the product to its own
    (row-count-dependent) one: a compiled decode step gives the same bits as the eager one. prepack: with the
    weight's blocked copy, looked up inside the op (a graph cannot make it)."""
    global _ROW_INVARIANT_OP
    if _ROW_INVARIANT_OP is None:
        _ROW_INVARIANT_OP = define_op(
            "row_invariant_linear", "(Tensor x, Tensor w, Tensor? bias, bool prepack) -> Tensor",
            lambda x, w, bias, prepack: _product(x, w, bias, prepack).clone(),  # an op's output may not be a view
            linear_fake)
    return _ROW_INVARIANT_OP


def _product(x2: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, prepack: bool) -> torch.Tensor:
    """_onednn_rows on w or, prepacked, on its blocked copy, in a dtype oneDNN runs in here (float32 for
    bfloat16 on an AVX2-only CPU)."""
    if prepack:
        w = blocked_copy(w, w.dtype if w.dtype in onednn_dtypes() else torch.float32)
    return _onednn_rows(x2, w, bias)  # (rows, out)


class RowInvariantLinear(BlockedCopyLinear):
    """nn.Linear whose CPU inference products give each row the same bits whatever the number of rows."""

    @classmethod
    def wrap(cls, linear: nn.Linear) -> "RowInvariantLinear":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight  # the same Parameter: tied weights stay tied
        new.bias = linear.bias
        new.onednn = onednn_linear_available()
        if new.onednn:
            _row_invariant_op()  # registered now: forward may run under torch.compile
        new.prepack = False  # whether products use the weight's blocked copy (kernels.blocked_copy)
        return new

    @property
    def op(self):
        """The custom op where oneDNN's linear is in this torch build, else None: kept at module level, not on
        the module, so that the module can be deep-copied (the op object cannot)."""
        return _ROW_INVARIANT_OP if self.onednn else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (self.op is not None and x.device.type == "cpu" and x.dtype == w.dtype
                and x.dtype in (torch.float32, torch.bfloat16) and not torch.is_grad_enabled()):
            x2 = x.reshape(-1, self.in_features)  # (rows, in)
            if torch.compiler.is_compiling():  # the custom op: the same kernel and bits, opaque to inductor
                y = self.op(x2, w, self.bias, self.prepack)  # (rows, out)
            else:
                y = _product(x2, w, self.bias, self.prepack)
            return y.view(*x.shape[:-1], self.out_features)
        return F.linear(x, w, self.bias)


def make_batch_invariant(model: nn.Module, prepack: bool | str = "auto") -> nn.Module:
    """Replace, in place, every float nn.Linear of `model` by a RowInvariantLinear sharing its parameters;
    return the model. Idempotent; quantized modules (not nn.Linear) are left alone. prepack: keep oneDNN-blocked
    copies of the weights (faster, twice the weights' memory); "auto": when they take at most a quarter of the
    machine's memory."""
    if prepack not in (True, False, "auto"):
        raise ValueError(f"prepack must be True, False or 'auto', got {prepack!r}")
    linears = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.weight.is_floating_point():
                if not isinstance(child, RowInvariantLinear):
                    child = RowInvariantLinear.wrap(child)
                    setattr(parent, name, child)
                linears.append(child)
    if prepack == "auto":
        prepack = pack_fits(linears)
    for m in linears:
        m.prepack = bool(prepack) and m.op is not None and m.weight.device.type == "cpu"
        if not m.prepack:
            release_blocked_copies(m.weight)
    return model
