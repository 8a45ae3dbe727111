"""
Opt-ins for decoding on CPU (sample.py and bench.py apply them there), measured in docs/benchmarks.md:

use_matvec(model): nn.Linear's products with 1 to 8 input rows (the tokens of a decode step) in float32 through
the form timed fastest on this CPU for each weight shape, of three: F.linear; `blocked`, one batched product over
row blocks of the weight (on some CPUs F.linear reads a weight for one row at a fraction of the memory bandwidth);
`packed`, oneDNN's product with the weight in its blocked layout for 8 rows (MKL's F.linear computes 8 rows
against the 50k-row head at a fraction of the bandwidth too). The math is F.linear's; training (many rows or
autograd), GPUs, bf16 and autocast take F.linear.

reuse_freed_memory(): glibc hands large freed blocks back to the OS, so a decode step's score-sized
temporaries (MBs at 32k context) come back as fresh pages that fault in on every step; this keeps them
in the process for reuse (as jemalloc or tcmalloc would).

    model = use_matvec(GPT(config)); reuse_freed_memory()
"""
import ctypes
import ctypes.util
import math
import statistics
import time
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

MATVEC_ROWS = 8  # inputs of up to this many rows (the tokens of a decode step) take a MatvecLinear's form


def row_blocks(out_features):
    """How many equal row blocks `blocked` splits a weight into (1: none, so it stays F.linear)."""
    return math.gcd(out_features, 8)


def blocked_linear(x, weight, bias):
    """F.linear(x, weight, bias) for x of few rows, as one batched product over row blocks of the weight."""
    rows, (out_features, in_features), blocks = x.numel() // x.shape[-1], weight.shape, row_blocks(weight.shape[0])
    weight = weight.view(blocks, out_features // blocks, in_features)
    y = torch.bmm(weight, x.reshape(rows, in_features).T.expand(blocks, -1, -1))  # (blocks, out/blocks, rows)
    y = y.view(out_features, rows).T  # (rows, out_features)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], out_features)


PACKED = WeakIdKeyDictionary()  # weight -> (its version when packed, oneDNN's copy): freed with the weight


def packed_product(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """F.linear(x, weight, bias) through oneDNN, the weight in its layout for MATVEC_ROWS rows: a copy made at the
    first call and again after the weight changes in place. No autograd."""
    version, packed = PACKED.get(weight, (None, None))
    if version != weight._version:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), MATVEC_ROWS)
        PACKED[weight] = weight._version, packed
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, 'none', [None], '')


packed_op = torch.library.custom_op('dar::packed_linear', packed_product, mutates_args=())
packed_op.register_fake(lambda x, weight, bias: x.new_empty(*x.shape[:-1], weight.shape[0]))


def packed_linear(x, weight, bias):
    """packed_product: compiling, as an op (a compiled step calls it, inductor does not see into it); eagerly, called
    directly, since a custom op's Python dispatch costs more than the product of a small weight for one row."""
    return packed_op(x, weight, bias) if torch.compiler.is_compiling() else packed_product(x, weight, bias)


FORMS = {'blocked': blocked_linear, 'packed': packed_linear}


class MatvecLinear(nn.Linear):
    form = 'blocked'  # a key of FORMS: use_matvec sets the one timed fastest for the weight's shape

    def forward(self, x):
        if (x.device.type != 'cpu' or x.numel() // self.in_features > MATVEC_ROWS or torch.is_autocast_enabled('cpu')
                or x.dtype != torch.float32 or self.weight.dtype != torch.float32
                or self.form == 'blocked' and row_blocks(self.out_features) == 1
                or self.form == 'packed' and torch.is_grad_enabled()):  # no autograd
            return super().forward(x)
        return FORMS[self.form](x, self.weight, self.bias)


def median_seconds(fn, repeats=15):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def fastest_form(out_features, in_features):
    """The key of FORMS to compute a weight of this shape with on this CPU, or None where F.linear is the fastest:
    the least time for one input row and for MATVEC_ROWS rows together."""
    weight = torch.randn(out_features, in_features)
    inputs = [torch.randn(rows, in_features) for rows in (1, MATVEC_ROWS)]
    usable = {'blocked': row_blocks(out_features) > 1, 'packed': torch.backends.mkldnn.is_available()}
    forms = {None: F.linear, **{name: form for name, form in FORMS.items() if usable[name]}}
    seconds = {}
    for name, form in forms.items():
        try:
            seconds[name] = sum(median_seconds(lambda: form(x, weight, None)) for x in inputs)
        except RuntimeError:  # a form this build cannot run on this CPU (oneDNN's packing): not a candidate
            pass
    return min(seconds, key=seconds.get)


def float32_cpu_linears(model):
    return [m for m in model.modules()
            if type(m) is nn.Linear and m.weight.device.type == 'cpu' and m.weight.dtype == torch.float32]


def matvec_forms(model, forms=None):
    """{weight shape: key of FORMS, or None for F.linear} for every float32 CPU nn.Linear of model: the shapes in
    forms as given there, the others timed here (fastest_form), once each."""
    forms = dict(forms or {})
    if not set(forms.values()) <= {None, *FORMS}:
        raise ValueError(f"matvec forms are None (F.linear) or one of {', '.join(FORMS)}, got {forms}")
    for shape in dict.fromkeys(tuple(m.weight.shape) for m in float32_cpu_linears(model)):
        if shape not in forms:
            forms[shape] = fastest_form(*shape)
    return forms


def use_matvec(model, forms=None):
    """model with every float32 CPU nn.Linear of a shape where a form of FORMS is faster than F.linear (matvec_forms:
    timed, or as in forms, decided before: bench.py decides once for the models it compares) computing as a
    MatvecLinear in that form (same parameters, same state_dict); the others stay nn.Linear."""
    forms = matvec_forms(model, forms)
    for module in float32_cpu_linears(model):
        if (form := forms[tuple(module.weight.shape)]) is not None:
            module.__class__, module.form = MatvecLinear, form
    return model


def reuse_freed_memory(limit=2**30):
    """glibc only (elsewhere a no-op): blocks up to limit bytes come from the heap and stay there when freed."""
    libc = ctypes.util.find_library('c')
    mallopt = getattr(ctypes.CDLL(libc), 'mallopt', None) if libc else None
    if mallopt is not None:
        mallopt(-1, limit)  # M_TRIM_THRESHOLD: keep this much free memory at the heap's top
        mallopt(-3, limit)  # M_MMAP_THRESHOLD: no fresh mmap for blocks below it
