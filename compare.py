"""
The paper's comparison in one command: train the four attention regimes with the same seeds,
data order and step budget, then tabulate and plot them.

    python compare.py config/compare_cpu.py --seeds=1337,1338
    python compare.py config/pythia_70m.py --nproc=8 --out_dir=out-compare-70m

    full      dar_window=None                   standard attention, the baseline
    dar       dar_window=W, dar_rank=r          full dims inside the window, rank-r latents beyond
    uniform   dar_window=0, dar_rank=r          every position reduced (the paper's negative control)
    local     dar_window=W, dar_rank=0          sliding window: does long-range memory matter at all?

The settings below are compare.py's own; every other one (in config files or --key=value)
goes to train.py for every run. Each run lives in <out_dir>/<regime>-seed<seed>/; running
the same command again continues unfinished runs from their checkpoints.
Writes <out_dir>/results.json, results.md and val_loss.png.
"""
import json
import math
import os
import statistics
import subprocess
import sys

import torch
from tqdm import tqdm

from configurator import configure
from model import GPT, GPTConfig

# -----------------------------------------------------------------------------
out_dir = 'out-compare'
seeds = '1337'  # comma-separated
regimes = 'full,dar,uniform,local'
dar_window = None  # W of the dar and local runs (required by them)
dar_rank = None  # r of the dar and uniform runs; None: head_dim // 4
nproc = 1  # processes per run; above 1 each run goes through torchrun (DDP)
# -----------------------------------------------------------------------------
config = {k: v for k, v in globals().items()
          if not k.startswith('_') and isinstance(v, (int, float, bool, str, type(None)))}
train_settings = configure(config, sys.argv[1:], passthrough=True)
globals().update(config)
# -----------------------------------------------------------------------------

TRAIN_PY = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'train.py')
REGIMES = {
    'full': {'dar_window': None, 'dar_rank': None},
    'dar': {'dar_window': dar_window, 'dar_rank': dar_rank},
    'uniform': {'dar_window': 0, 'dar_rank': dar_rank},
    'local': {'dar_window': dar_window, 'dar_rank': 0},
}
regime_names = regimes.split(',')
if unknown := [r for r in regime_names if r not in REGIMES]:
    raise SystemExit(f"unknown regime(s) {', '.join(unknown)}; choose from {', '.join(REGIMES)}")
if {'dar', 'local'} & set(regime_names) and (dar_window is None or dar_window <= 0):
    raise SystemExit("the dar and local regimes need a window: set dar_window (e.g. --dar_window=64)")
try:
    seed_list = [int(s) for s in seeds.split(',')]
except ValueError:
    raise SystemExit(f"seeds must be comma-separated integers, got '{seeds}'") from None
if nproc < 1:
    raise SystemExit(f"nproc must be at least 1, got {nproc}")
if 'seed' in train_settings:
    raise SystemExit("compare.py sets each run's seed: use --seeds (e.g. --seeds=1337,1338)")


def train(regime, seed, run_dir, bar):
    """Run train.py for one regime and seed, echoing its output above the progress bar and to train.log."""
    settings = {**train_settings, **REGIMES[regime], 'seed': seed, 'out_dir': run_dir}
    ckpt_path = os.path.join(run_dir, 'ckpt.pt')
    if os.path.exists(ckpt_path):
        done = torch.load(ckpt_path, map_location='cpu', weights_only=True)
        if done['iter_num'] >= settings.get('max_iters', done['config']['max_iters']):
            bar.write(f"[{regime} seed {seed}] finished earlier: {ckpt_path}")
            return
        settings['init_from'] = 'resume'
    launcher = [] if nproc == 1 else ['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}']
    cmd = [sys.executable, *launcher, TRAIN_PY, *(f'--{k}={v!r}' for k, v in settings.items())]
    os.makedirs(run_dir, exist_ok=True)
    env = {**os.environ, 'PYTHONUNBUFFERED': '1'}  # lines as they come, not in 4 KB chunks
    with open(os.path.join(run_dir, 'train.log'), 'a', encoding='utf-8') as log, \
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        for line in proc.stdout:
            log.write(line)
            bar.write(f"[{regime} seed {seed}] {line.rstrip()}")
    if proc.returncode:
        raise SystemExit(f"{regime} seed {seed} failed (exit code {proc.returncode}); "
                         f"its output is in {run_dir}/train.log")


def summarize(regime, seed, run_dir):
    with open(os.path.join(run_dir, 'log.jsonl'), encoding='utf-8') as f:
        records = [json.loads(line) for line in f]
    ckpt = torch.load(os.path.join(run_dir, 'ckpt.pt'), map_location='cpu', weights_only=True)
    model_config = GPTConfig(**ckpt['model_args'])
    if model_config.regime != regime:  # e.g. a window no shorter than block_size is full attention
        raise SystemExit(f"the {regime} run of seed {seed} trained {model_config.regime} attention "
                         f"(dar_window={model_config.dar_window}, block_size={model_config.block_size})")
    # the KV cache at the training context, in the dtype the model computes in; on the meta
    # device nothing is allocated, which matters at Pythia sizes
    with torch.device('meta'):
        model = GPT(model_config)
    cache_dtype = torch.bfloat16 if ckpt['config']['dtype'] == 'bfloat16' else torch.float32
    T = model_config.block_size
    throughputs = [r['tokens_per_sec'] for r in records if 'tokens_per_sec' in r]
    return {
        'regime': regime, 'seed': seed,
        'dar_window': model_config.dar_window, 'dar_rank': model_config.dar_rank,
        'params': model.get_num_params(),
        'iters': records[-1]['iter'], 'tokens': records[-1]['tokens'],
        'val_loss': records[-1]['val_loss'], 'perplexity': math.exp(records[-1]['val_loss']),
        # the median leaves out the first interval's start-up (and compile) time
        'tokens_per_sec': statistics.median(throughputs) if throughputs else None,
        'kv_bytes_per_token': model.new_cache(1, T, dtype=cache_dtype).nbytes() / T,
        'curve': [(r['iter'], r['val_loss']) for r in records],
    }


def mean_spread(values):
    """'mean ± sample std' over seeds, or the single value."""
    mean = statistics.fmean(values)
    return (mean, statistics.stdev(values)) if len(values) > 1 else (mean, None)


def fmt(mean_std, digits):
    mean, std = mean_std
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def write_report(runs):
    summary = {}
    full_loss = {r['seed']: r['val_loss'] for r in runs if r['regime'] == 'full'}
    for regime in regime_names:
        rs = [r for r in runs if r['regime'] == regime]
        # seeds move every regime together (init, data order), so the paired difference to the
        # same seed's full-attention run is the sharper measure
        deltas = [r['val_loss'] - full_loss[r['seed']] for r in rs if r['seed'] in full_loss]
        speeds = [r['tokens_per_sec'] for r in rs if r['tokens_per_sec'] is not None]
        summary[regime] = {
            'val_loss': mean_spread([r['val_loss'] for r in rs]),
            'perplexity': mean_spread([r['perplexity'] for r in rs]),
            'val_loss_minus_full': mean_spread(deltas) if deltas else None,
            'tokens_per_sec': statistics.fmean(speeds) if speeds else None,
            'kv_bytes_per_token': rs[0]['kv_bytes_per_token'],
            'params': rs[0]['params'], 'dar_window': rs[0]['dar_window'], 'dar_rank': rs[0]['dar_rank'],
        }
    with open(os.path.join(out_dir, 'results.json'), 'w', encoding='utf-8') as f:
        json.dump({'seeds': seed_list, 'train_settings': train_settings, 'summary': summary, 'runs': runs}, f, indent=1)

    full_kv = summary['full']['kv_bytes_per_token'] if 'full' in summary else None
    first = runs[0]
    lines = [
        f"Final validation loss after {first['iters']} iterations ({first['tokens']:,} tokens) per run; "
        f"mean ± sample std over seeds {', '.join(map(str, seed_list))}. KV-cache bytes per token at the "
        f"training context, batch 1.",
        "",
        "| regime | window W | rank r | val loss | minus full (same seed) | perplexity | tokens/s | KV bytes/token "
        "| KV vs full | params |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for regime, s in summary.items():
        kv_ratio = f"{s['kv_bytes_per_token'] / full_kv:.2f}" if full_kv else "-"
        speed = f"{s['tokens_per_sec']:,.0f}" if s['tokens_per_sec'] else "-"
        window = '-' if regime == 'full' else s['dar_window']
        rank = '-' if regime == 'full' else s['dar_rank']
        delta = fmt(s['val_loss_minus_full'], 4) if s['val_loss_minus_full'] else '-'
        lines.append(f"| {regime} | {window} | {rank} | {fmt(s['val_loss'], 4)} | {delta} | {fmt(s['perplexity'], 2)} | "
                     f"{speed} | {s['kv_bytes_per_token']:,.0f} | {kv_ratio} | {s['params']:,} |")
    with open(os.path.join(out_dir, 'results.md'), 'w', encoding='utf-8') as f:
        f.write('\n'.join(lines) + '\n')
    print('\n'.join(lines))

    import matplotlib
    matplotlib.use('Agg')  # files only, no display needed
    import matplotlib.pyplot as plt
    fig, (ax, ax_diff) = plt.subplots(1, 2, figsize=(12, 4.5))
    band = ' (mean, band: min-max over seeds)' if len(seed_list) > 1 else ''
    full_curves = {r['seed']: r['curve'] for r in runs if r['regime'] == 'full'}
    for regime in regime_names:
        rs = [r for r in runs if r['regime'] == regime]
        iters = [it for it, _ in rs[0]['curve']][1:]  # from the first eval after step 0
        losses = [[loss for _, loss in r['curve']][1:] for r in rs]
        panels = [(ax, losses)]
        if full_curves:  # the same seed's full-attention loss subtracted: what the regime costs
            diffs = [[loss - f for loss, (_, f) in zip(l, full_curves[r['seed']][1:])] for l, r in zip(losses, rs)]
            panels.append((ax_diff, diffs))
        for axis, curves in panels:
            per_step = list(zip(*curves))
            line, = axis.plot(iters, [statistics.fmean(v) for v in per_step], label=regime)
            if len(curves) > 1:
                axis.fill_between(iters, [min(v) for v in per_step], [max(v) for v in per_step],
                                  color=line.get_color(), alpha=0.2)
    ax.set_ylabel('validation loss')
    ax.set_title('validation loss' + band, fontsize=10)
    ax_diff.set_ylabel('validation loss - full attention (same seed)')
    ax_diff.set_title('difference to full attention' + band, fontsize=10)
    ax_diff.axhline(0, color='gray', linewidth=0.8)
    for axis in (ax, ax_diff):
        axis.set_xlabel('iteration')
        axis.legend()
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, 'val_loss.png'), dpi=120)
    print(f"wrote {out_dir}/results.json, results.md, val_loss.png")


runs = [(regime, seed, os.path.join(out_dir, f'{regime}-seed{seed}')) for seed in seed_list for regime in regime_names]
with tqdm(runs, unit='run', desc='compare') as bar:
    for regime, seed, run_dir in bar:
        bar.set_description(f"compare: {regime} seed {seed}")
        train(regime, seed, run_dir, bar)
write_report([summarize(*run) for run in runs])
