"""
Opt-ins for decoding on CPU (sample.py and bench.py apply them there), measured in docs/benchmarks.md:

use_matvec(model): nn.Linear's matrix-vector products in float32 as one batched product over row blocks
of the weight, for the weight shapes where that is measured faster here. On some CPUs PyTorch's F.linear reads
a weight for 1 to 8 input rows at a fraction of the memory bandwidth and the blocked product several times
faster; on others F.linear is the faster (both measured in docs/benchmarks.md), so use_matvec times the two once
per weight shape and keeps F.linear where it wins. The math is F.linear's; training (many rows), GPUs, bf16 and
autocast take F.linear.

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

import torch
import torch.nn as nn
import torch.nn.functional as F

MATVEC_ROWS = 8  # inputs of up to this many rows (the tokens of a decode step) take the blocked path


def blocked_linear(x, weight, bias, blocks):
    """F.linear(x, weight, bias) for x of few rows, as one batched product over `blocks` row blocks of the weight."""
    rows, (out_features, in_features) = x.numel() // x.shape[-1], weight.shape
    weight = weight.view(blocks, out_features // blocks, in_features)
    y = torch.bmm(weight, x.reshape(rows, in_features).T.expand(blocks, -1, -1))  # (blocks, out/blocks, rows)
    y = y.view(out_features, rows).T  # (rows, out_features)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], out_features)


class MatvecLinear(nn.Linear):
    def forward(self, x):
        rows, blocks = x.numel() // self.in_features, math.gcd(self.out_features, 8)
        if (x.device.type != 'cpu' or rows > MATVEC_ROWS or blocks == 1 or torch.is_autocast_enabled('cpu')
                or x.dtype != torch.float32 or self.weight.dtype != torch.float32):
            return super().forward(x)
        return blocked_linear(x, self.weight, self.bias, blocks)


def median_seconds(fn, repeats=15):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def blocked_is_faster(out_features, in_features):
    """Whether the blocked product of one input row beats F.linear on this CPU, timed on a weight of this shape."""
    weight, x = torch.randn(out_features, in_features), torch.randn(1, in_features)
    blocks = math.gcd(out_features, 8)
    return blocks > 1 and (median_seconds(lambda: blocked_linear(x, weight, None, blocks))
                           < median_seconds(lambda: F.linear(x, weight)))


def use_matvec(model):
    """model with every float32 CPU nn.Linear of a shape where the blocked product is measured faster computing as
    MatvecLinear (same parameters, same state_dict); the others stay nn.Linear."""
    faster = {}
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.device.type == 'cpu' and module.weight.dtype == torch.float32:
            shape = module.weight.shape
            if shape not in faster:
                faster[shape] = blocked_is_faster(*shape)
            if faster[shape]:
                module.__class__ = MatvecLinear
    return model


def reuse_freed_memory(limit=2**30):
    """glibc only (elsewhere a no-op): blocks up to limit bytes come from the heap and stay there when freed."""
    libc = ctypes.util.find_library('c')
    mallopt = getattr(ctypes.CDLL(libc), 'mallopt', None) if libc else None
    if mallopt is not None:
        mallopt(-1, limit)  # M_TRIM_THRESHOLD: keep this much free memory at the heap's top
        mallopt(-3, limit)  # M_MMAP_THRESHOLD: no fresh mmap for blocks below it
