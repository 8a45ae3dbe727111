"""
An opt-in for decoding on CPU in float32 (sample.py and bench.py apply it there): nn.Linear's
matrix-vector products as one batched product over row blocks of the weight. For 1 to 8 input rows
PyTorch's CPU F.linear reads a weight at a fraction of the memory bandwidth; the blocked product
reads it several times faster (measured: docs/benchmarks.md). The math is F.linear's; training
(many rows), GPUs, bf16 and autocast take F.linear.

    model = use_matvec(GPT(config))
"""
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
