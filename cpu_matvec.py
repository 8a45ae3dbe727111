"""
Opt-ins for decoding on CPU (sample.py and bench.py apply them there), measured in docs/benchmarks.md:

use_matvec(model): nn.Linear's matrix-vector products in float32 as one batched product over row blocks
of the weight. For 1 to 8 input rows PyTorch's CPU F.linear reads a weight at a fraction of the memory
bandwidth; the blocked product reads it several times faster. The math is F.linear's; training (many
rows), GPUs, bf16 and autocast take F.linear.

reuse_freed_memory(): glibc hands large freed blocks back to the OS, so a decode step's score-sized
temporaries (MBs at 32k context) come back as fresh pages that fault in on every step; this keeps them
in the process for reuse (as jemalloc or tcmalloc would).

    model = use_matvec(GPT(config)); reuse_freed_memory()
"""
import ctypes
import ctypes.util
import math

import torch
import torch.nn as nn

MATVEC_ROWS = 8  # inputs of up to this many rows (the tokens of a decode step) take the blocked path


class MatvecLinear(nn.Linear):
    def forward(self, x):
        rows, blocks = x.numel() // self.in_features, math.gcd(self.out_features, 8)
        if (x.device.type != 'cpu' or rows > MATVEC_ROWS or blocks == 1 or torch.is_autocast_enabled('cpu')
                or x.dtype != torch.float32 or self.weight.dtype != torch.float32):
            return super().forward(x)
        weight = self.weight.view(blocks, self.out_features // blocks, self.in_features)
        y = torch.bmm(weight, x.reshape(rows, self.in_features).T.expand(blocks, -1, -1))  # (blocks, out/blocks, rows)
        y = y.view(self.out_features, rows).T  # (rows, out_features)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def use_matvec(model):
    """model with every nn.Linear computing as MatvecLinear (same parameters, same state_dict)."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = MatvecLinear
    return model


def reuse_freed_memory(limit=2**30):
    """glibc only (elsewhere a no-op): blocks up to limit bytes come from the heap and stay there when freed."""
    libc = ctypes.util.find_library('c')
    mallopt = getattr(ctypes.CDLL(libc), 'mallopt', None) if libc else None
    if mallopt is not None:
        mallopt(-1, limit)  # M_TRIM_THRESHOLD: keep this much free memory at the heap's top
        mallopt(-3, limit)  # M_MMAP_THRESHOLD: no fresh mmap for blocks below it
