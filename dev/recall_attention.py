"""
Why does a DAR recall run bind keys to values in one seed and not in another? For every answer of
the test split, where the last layer's attention goes: the mass on the asked pair (its key and value
positions, both beyond the window) and, as a counterfactual, the mass the same queries and keys
would give that pair if distant tokens were read in full dims (no latent bottleneck). A seed that
fails with a high counterfactual mass lost the binding in the latents; one that fails with a low
one never learned to look for the key at all.

    python dev/recall_attention.py out-recall/dar-W4-r8-seed1 out-recall/dar-W4-r8-seed2 ... [--data=data/recall]

Prints a table and writes dev/recall_attention.json (or --out=...).
"""
import argparse
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import IGNORE, Dataset  # noqa: E402
from evaluate import load_run  # noqa: E402
from model import visible  # noqa: E402


@torch.no_grad()
def pair_mass(run_dir, data, n_examples):
    """(recall accuracy, per layer and head the mean attention mass on the asked pair: read through
    the latents as the model does, and in full dims) over n_examples test examples."""
    model, _ = load_run(run_dir)
    cfg, n_pairs = model.config, data.meta['task']['n_pairs']
    inputs = []
    hooks = [b.attn.register_forward_pre_hook(lambda attn, args: inputs.append((attn, args[:3])))
             for b in model.transformer.h]
    x, y = next(data.fixed_batches('test', cfg.block_size, n_examples, n_examples))
    logits, _ = model(x)
    for h in hooks:
        h.remove()
    answers = (y != IGNORE).nonzero(as_tuple=True)  # (example, position): the position holds the asked key
    accuracy = (logits.argmax(-1)[answers] == y[answers]).float().mean().item()
    pair = (x[answers[0], :2 * n_pairs:2] == x[answers][:, None]).int().argmax(1)  # which pair is asked
    pos = torch.arange(cfg.block_size)
    local, far = visible(pos, pos, cfg.window)
    result = []
    for attn, args in inputs:
        q, k, _ = attn.qkv(*args)  # (B, H, T, d)
        maps, scale = attn.latent_maps(), 1 / math.sqrt(cfg.head_dim)
        full = q @ k.transpose(-2, -1) * scale
        latent = full if maps is None else (q @ maps[1].transpose(-2, -1)) @ (k @ maps[0]).transpose(-2, -1) * scale
        masses = {}
        for name, scores in (('latent', torch.where(far, latent, full)), ('full_dims', full)):
            p = scores.masked_fill(~(local | far), -math.inf).softmax(-1)  # (B, H, T, T)
            rows = p[answers[0], :, answers[1]]  # (answers, H, T)
            both = rows.gather(-1, torch.stack([2 * pair, 2 * pair + 1], 1)[:, None, :].expand(-1, rows.shape[1], -1))
            masses[name] = both.sum(-1).mean(0).tolist()  # per head
        result.append(masses)
    return accuracy, result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('runs', nargs='+')
    parser.add_argument('--data', default='data/recall')
    parser.add_argument('--examples', type=int, default=500)
    parser.add_argument('--out', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'recall_attention.json'))
    args = parser.parse_args()
    data = Dataset(args.data)
    rows = {}
    print("| run | recall acc | last layer, best head: mass on the asked pair (latents) | ... read in full dims |")
    print("|---|---|---|---|")
    for run in args.runs:
        accuracy, layers = pair_mass(run, data, args.examples)
        last = layers[-1]
        best = max(range(len(last['latent'])), key=lambda h: last['full_dims'][h])
        rows[run] = {'recall_accuracy': accuracy, 'layers': layers}
        print(f"| {os.path.basename(run.rstrip('/'))} | {accuracy:.3f} | {last['latent'][best]:.3f} | "
              f"{last['full_dims'][best]:.3f} |")
    with open(args.out, 'w', encoding='utf-8') as f:
        json.dump(rows, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == '__main__':
    main()
