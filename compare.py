"""
The paper's comparison in one command: train the attention regimes with the same seeds, data
order and step budget, measure what each does with distant context, then tabulate and plot.

    python compare.py config/compare_cpu.py --seeds=1337,1338
    python compare.py config/recall_cpu.py --dar_ranks=16,8,4,2       # a sweep over the rank
    python compare.py config/pythia_70m.py --nproc=8 --out_dir=out-compare-70m

    full      dar_window=None                   standard attention, the baseline
    dar       dar_window=W, dar_rank=r          full dims inside the window, rank-r latents beyond
    uniform   dar_window=0, dar_rank=r          every position reduced (the paper's negative control)
    local     dar_window=W, dar_rank=0          sliding window: does long-range memory matter at all?

--dar_windows and --dar_ranks take comma-separated lists: dar runs for every (W, r) of the
grid, uniform for every r, local for every W, full once, each with every seed (dar_window and
dar_rank, as a config file shared with train.py sets them, count as one-item lists). The settings
below are compare.py's own; every other one (in config files or --key=value) goes to
train.py for every run. Each run lives in <out_dir>/<name>-seed<seed>/ (e.g. dar-W16-r8);
running the same command again continues unfinished runs from their checkpoints, and a run
whose recorded settings differ from the ones asked for is an error, never silently reused.
After training every run is evaluated (evaluate.py: loss by position, the copy test and the loss on
long-range tokens on a token stream; recall accuracy on a recall dataset, with the binding rate and
its 95% interval from 3 seeds on). Writes <out_dir>/results.json, results.md, val_loss.png,
loss_by_position.png, memory_quality.png (every seed a point), copy_test.png and long_range.png.

Retrofit (the paper's second experiment): every run starts from the same trained full-attention
model and continues on the same data for the same steps; the control is full attention:

    python compare.py config/retrofit_cpu.py --init_from=out-compare-cpu/full-seed1337/ckpt.pt

runs full, dar (calibrated latent maps), dar-...-random (random maps), uniform (calibrated) and
local; the table adds the loss at step 0 and the first step at which each run comes within 1%
of the control's loss, and val_loss.png shows the recovery from step 0.
"""
import json
import math
import os
import statistics
import subprocess
import sys
from collections import namedtuple

import torch
from tqdm import tqdm

import evaluate
from configurator import configure
from model import GPT, REGIMES, GPTConfig, regime_settings
from storage import load_checkpoint

# -----------------------------------------------------------------------------
out_dir = 'out-compare'
seeds = '1337'  # comma-separated
regimes = 'full,dar,uniform,local'
dar_windows = ''  # comma-separated W of the dar and local runs (required by them)
dar_ranks = ''  # comma-separated r of the dar and uniform runs; empty: head_dim // 4
nproc = 1  # processes per run; above 1 each run goes through torchrun (DDP)
eval_sequences = 128  # fixed validation sequences for the loss by position
# -----------------------------------------------------------------------------
Run = namedtuple('Run', 'setting seed')


def int_list(name, text, low):
    """The comma-separated integers of setting `name`: each at least low, and each once (a run twice would be
    trained once and counted twice)."""
    try:
        values = [int(s) for s in str(text).split(',') if s.strip()]
    except ValueError:
        raise SystemExit(f"{name} must be comma-separated integers, got '{text}'") from None
    if too_low := [v for v in values if v < low]:
        raise SystemExit(f"{name} must be at least {low}, got {too_low[0]}")
    if repeated := sorted({v for v in values if values.count(v) > 1}):
        raise SystemExit(f"{name} lists {', '.join(map(str, repeated))} more than once; give each value once")
    return values


# one run's model settings: regime, dar_window, dar_rank as GPTConfig takes them; name e.g. 'dar-W16-r8'
Setting = namedtuple('Setting', 'regime dar_window dar_rank name')


def regime_grid(regimes, windows, ranks):
    """Every regime at every setting it depends on: dar at each (W, r), uniform at each r, local
    at each W, full once. An empty ranks list means the default rank (d/4)."""
    options = {'full': [(None, None)],
               'dar': [(w, r) for w in windows for r in ranks or [None]],
               'uniform': [(None, r) for r in ranks or [None]],
               'local': [(w, None) for w in windows]}
    return [Setting(regime, *regime_settings(regime, w, r),
                    regime + (f'-W{w}' if w is not None else '') + (f'-r{r}' if r is not None else ''))
            for regime in regimes for w, r in options[regime]]


if __name__ == '__main__':
    config = {k: v for k, v in globals().items()
              if not k.startswith('_') and isinstance(v, (int, float, bool, str, type(None)))}
    train_settings = configure(config, sys.argv[1:], passthrough=True)
    globals().update(config)
    # -----------------------------------------------------------------------------
    regime_names = regimes.split(',')
    if unknown := [r for r in regime_names if r not in REGIMES]:
        raise SystemExit(f"unknown regime(s) {', '.join(unknown)}; choose from {', '.join(REGIMES)}")
    # A single dar_window / dar_rank (what a config file shared with train.py sets) is a one-item list.
    for single, plural in (('dar_window', 'dar_windows'), ('dar_rank', 'dar_ranks')):
        if single in train_settings:
            if config[plural]:
                raise SystemExit(f"both {single} and {plural} are set; give the values as --{plural} only")
            value = train_settings.pop(single)
            config[plural] = '' if value is None else str(value)
    window_list = int_list('dar_windows', config['dar_windows'], 1)
    rank_list = int_list('dar_ranks', config['dar_ranks'], 1)  # 0 would make dar local-only
    seed_list = int_list('seeds', seeds, 0)  # train.py's seed is at least 0
    if {'dar', 'local'} & set(regime_names) and not window_list:
        raise SystemExit("the dar and local regimes need a window: set dar_windows (e.g. --dar_windows=64 or 16,32,64)")
    if nproc < 1:
        raise SystemExit(f"nproc must be at least 1, got {nproc}")
    if not seed_list:
        raise SystemExit("seeds is empty: give at least one (e.g. --seeds=1337,1338)")
    if 'seed' in train_settings:
        raise SystemExit("compare.py sets each run's seed: use --seeds (e.g. --seeds=1337,1338)")
    init_from = train_settings.get('init_from', 'scratch')
    if init_from == 'resume':
        raise SystemExit("compare.py continues unfinished runs by itself: leave init_from out (or give the model to "
                         "retrofit: --init_from=<ckpt.pt or GPT-NeoX model>)")
    if window_list and isinstance(train_settings.get('block_size'), int) and max(window_list) >= train_settings['block_size']:
        raise SystemExit(f"dar_windows must be below block_size ({train_settings['block_size']}): a window that "
                         f"long is full attention")
    retrofit = init_from != 'scratch'
    settings_grid = regime_grid(regime_names, window_list, rank_list)
    # a retrofit also runs dar with random latent maps: what the calibration is worth
    RANDOM_MAPS = {s.name + '-random' for s in settings_grid if s.regime == 'dar'} if retrofit else set()
    settings_grid += [s._replace(name=s.name + '-random') for s in settings_grid if s.name + '-random' in RANDOM_MAPS]
    runs = [Run(setting, seed) for seed in seed_list for setting in settings_grid]
    reference_window = min(window_list) if window_list else None  # W of the long-context gain, for every run


def run_dir(run):
    return os.path.join(out_dir, f'{run.setting.name}-seed{run.seed}')


def settings_of(run):
    settings = {**train_settings, 'dar_window': run.setting.dar_window, 'dar_rank': run.setting.dar_rank,
                'seed': run.seed, 'out_dir': run_dir(run)}
    if retrofit:
        settings['latent_init'] = 'random' if run.setting.name in RANDOM_MAPS else 'calibrated'
    return settings


def check_reuse(run, settings):
    """A run directory is continued only if it was started with exactly these settings; one that holds
    no checkpoint has nothing to continue (e.g. a run whose settings train.py refused), so it is free."""
    path = os.path.join(run_dir(run), 'settings.json')
    trained = os.path.exists(os.path.join(run_dir(run), 'ckpt.pt'))
    if not os.path.exists(path) or not trained:
        if trained:
            raise SystemExit(f"{run_dir(run)} holds a checkpoint but no settings.json, so its settings are unknown; "
                             "use another --out_dir, or delete that directory to train it again")
        return
    with open(path, encoding='utf-8') as f:
        recorded = json.load(f)
    if recorded != settings:
        diffs = [f"{k}: recorded {recorded.get(k, '(unset)')!r}, asked {settings.get(k, '(unset)')!r}"
                 for k in sorted(set(recorded) | set(settings)) if recorded.get(k) != settings.get(k)]
        raise SystemExit(f"{run_dir(run)} was trained with other settings ({'; '.join(diffs)}); use another "
                         "--out_dir for these settings, or delete that directory to train it again")


def train(run, bar):
    """Run train.py for one run, echoing its output above the progress bar and to train.log."""
    settings = settings_of(run)
    check_reuse(run, settings)
    label = f"[{run.setting.name} seed {run.seed}]"
    ckpt_path = os.path.join(run_dir(run), 'ckpt.pt')
    args = dict(settings)
    if os.path.exists(ckpt_path):
        done = load_checkpoint(ckpt_path)
        if done['iter_num'] >= done['config']['max_iters']:
            bar.write(f"{label} finished earlier: {ckpt_path}")
            return
        args['init_from'] = 'resume'
    launcher = [] if nproc == 1 else ['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}']
    train_py = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'train.py')
    cmd = [sys.executable, *launcher, train_py, *(f'--{k}={v!r}' for k, v in args.items())]
    os.makedirs(run_dir(run), exist_ok=True)
    with open(os.path.join(run_dir(run), 'settings.json'), 'w', encoding='utf-8') as f:
        json.dump(settings, f, indent=1)
    env = {**os.environ, 'PYTHONUNBUFFERED': '1'}  # lines as they come, not in 4 KB chunks
    with open(os.path.join(run_dir(run), 'train.log'), 'a', encoding='utf-8') as log, \
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        for line in proc.stdout:
            log.write(line)
            bar.write(f"{label} {line.rstrip()}")
    if proc.returncode:
        raise SystemExit(f"{run.setting.name} seed {run.seed} failed (exit code {proc.returncode}); "
                         f"its output is in {run_dir(run)}/train.log")


def summarize(run):
    with open(os.path.join(run_dir(run), 'log.jsonl'), encoding='utf-8') as f:
        records = [json.loads(line) for line in f]
    ckpt = load_checkpoint(os.path.join(run_dir(run), 'ckpt.pt'))
    model_config = GPTConfig(**ckpt['model_args'])
    if model_config.regime != run.setting.regime:  # e.g. a window no shorter than block_size is full attention
        raise SystemExit(f"the {run.setting.name} run of seed {run.seed} trained {model_config.regime} attention "
                         f"(dar_window={model_config.dar_window}, block_size={model_config.block_size})")
    # the KV cache at the training context, in the dtype the model computes in; on the meta
    # device nothing is allocated, which matters at Pythia sizes
    with torch.device('meta'):
        model = GPT(model_config)
    cache_dtype = torch.bfloat16 if ckpt['config']['dtype'] == 'bfloat16' else torch.float32
    T = model_config.block_size
    throughputs = [r['tokens_per_sec'] for r in records if 'tokens_per_sec' in r]
    device = train_settings.get('device', 'cuda' if torch.cuda.is_available() else 'cpu')
    return {
        'name': run.setting.name, 'regime': run.setting.regime, 'seed': run.seed,
        'dar_window': model_config.dar_window, 'dar_rank': model_config.dar_rank,
        'params': model.get_num_params(),
        'iters': records[-1]['iter'], 'tokens': records[-1]['tokens'],
        'val_loss': records[-1]['val_loss'], 'perplexity': math.exp(records[-1]['val_loss']),
        'val_loss_start': records[0]['val_loss'] if records[0]['iter'] == 0 else None,
        # the median leaves out the first interval's start-up (and compile) time
        'tokens_per_sec': statistics.median(throughputs) if throughputs else None,
        'kv_bytes_per_token': model.new_cache(1, T, dtype=cache_dtype).nbytes() / T,
        'curve': [(r['iter'], r['val_loss']) for r in records],
        **evaluate.evaluate_run(run_dir(run), n_sequences=eval_sequences, window=reference_window, device=device),
    }


def mean_spread(values):
    """(mean, sample std) over seeds, std None for a single value; None for no values."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    mean = statistics.fmean(values)
    return (mean, statistics.stdev(values)) if len(values) > 1 else (mean, None)


def fmt(mean_std, digits):
    if mean_std is None:
        return '-'
    mean, std = mean_std
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def per_position(curves, reduce):
    """reduce() of every position over curves, None where no curve has a value."""
    return [reduce([v for v in vs if v is not None]) if any(v is not None for v in vs) else None
            for vs in zip(*curves)]


def steps_to_control(run, control, tolerance=0.01, floor=1e-3):
    """The first eval step at which run's val loss is within `tolerance` (relative) of the control's
    at the same step, or within `floor` nats (1% of a loss near zero, as on a solved recall task,
    is no bar at all); None if it never is."""
    ok = [it for (it, loss), (_, ref) in zip(run['curve'], control['curve'])
          if loss <= max(ref * (1 + tolerance), ref + floor)]
    return ok[0] if ok else None


BIND_ACCURACY = 0.95  # a recall run binds keys to values when its test accuracy reaches this
BIND_LOSS = 0.2  # ... and it has bound by the first eval whose answer loss is under this (shortcut: ~0.8)


def wilson(k, n, z=1.96):
    """The 95% Wilson score interval of a rate of k in n."""
    p, z2 = k / n, z * z
    centre, half = (p + z2 / (2 * n)) / (1 + z2 / n), z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def steps_to_bind(run):
    """The first eval step with val loss under BIND_LOSS, None if none."""
    return next((it for it, loss in run['curve'] if loss < BIND_LOSS), None)


def summarize_setting(rs, full_by_seed):
    """Mean and spread over the seeds of one setting (rs: its runs)."""
    first = rs[0]

    def minus_full(key):
        # seeds move every regime together (init, data order), so the paired difference to the
        # same seed's full-attention run is the sharper measure
        return mean_spread([r[key] - full_by_seed[r['seed']][key] for r in rs if r['seed'] in full_by_seed
                            and r[key] is not None and full_by_seed[r['seed']][key] is not None])
    s = {
        'regime': first['regime'], 'dar_window': first['dar_window'], 'dar_rank': first['dar_rank'],
        'params': first['params'], 'kv_bytes_per_token': first['kv_bytes_per_token'],
        'val_loss': mean_spread([r['val_loss'] for r in rs]),
        'perplexity': mean_spread([r['perplexity'] for r in rs]),
        'val_loss_minus_full': minus_full('val_loss'),
        'val_loss_start': mean_spread([r['val_loss_start'] for r in rs]),
        'steps_to_within_1pct': [steps_to_control(r, full_by_seed[r['seed']]) for r in rs if r['seed'] in full_by_seed],
        'tokens_per_sec': mean_spread([r['tokens_per_sec'] for r in rs]),
        'long_context_gain': mean_spread([r['long_context_gain'] for r in rs]),
        'loss_by_position': per_position([r['loss_by_position'] for r in rs], statistics.fmean),
    }
    if 'recall_accuracy' in first:
        s['recall_accuracy'] = mean_spread([r['recall_accuracy'] for r in rs])
        s['recall_accuracy_by_distance'] = {b: mean_spread([r['recall_accuracy_by_distance'].get(b) for r in rs])
                                            for b in first['recall_accuracy_by_distance']}
        bound = sum(r['recall_accuracy'] >= BIND_ACCURACY for r in rs)
        s['binding'] = {'bound': bound, 'seeds': len(rs), 'interval': wilson(bound, len(rs)),
                        'steps_to_bind': [steps_to_bind(r) for r in rs]}
    if 'copy_loss_drop' in first:
        s['copy_loss_drop'] = mean_spread([r['copy_loss_drop'] for r in rs])
    if 'long_range_loss' in first:
        for kind in ('long_range', 'short_range'):
            s[f'{kind}_loss'] = mean_spread([r[f'{kind}_loss'] for r in rs])
            s[f'{kind}_tokens'] = mean_spread([r[f'{kind}_tokens'] for r in rs])
        s['long_range_loss_minus_full'] = minus_full('long_range_loss')
    return s


def write_report(results):
    full_by_seed = {r['seed']: r for r in results if r['regime'] == 'full'}
    names = list(dict.fromkeys(r['name'] for r in results))
    summary = {name: summarize_setting([r for r in results if r['name'] == name], full_by_seed) for name in names}
    recall = 'recall_accuracy' in results[0]
    with open(os.path.join(out_dir, 'results.json'), 'w', encoding='utf-8') as f:
        json.dump({'seeds': seed_list, 'train_settings': train_settings, 'long_context_window': reference_window,
                   'summary': summary, 'runs': results}, f, indent=1)

    full_kv = summary['full']['kv_bytes_per_token'] if 'full' in summary else None
    first = results[0]
    gain_note = (f"long-ctx gain: mean loss at positions >= 4W minus < W with W = {reference_window} for every "
                 f"run (negative: later positions are easier; only a gain beyond local-only's comes from distant "
                 f"tokens)") if reference_window else ""
    lines = [
        f"Final validation loss after {first['iters']} iterations ({first['tokens']:,} tokens) per run; "
        f"mean ± sample std over seeds {', '.join(map(str, seed_list))}. KV-cache bytes per token at the "
        f"training context, batch 1. {gain_note}",
    ]
    if retrofit:
        lines.append(f"Every run starts from {init_from}; 'within 1%': the first eval step at which a run's val loss "
                     f"is within 1% (or 0.001) of full attention's at that step, per seed ('never': not within "
                     f"{first['iters']} steps).")
    copy = 'copy_loss_drop' in first
    long_range = 'long_range_loss' in first
    binding = recall and len(seed_list) >= 3
    if recall:
        lines.append(f"Recall accuracy on {first['recall_answers']} test answers; chance "
                     f"{first['recall_chance']:.3f}, shortcut without binding keys to values {first['recall_shortcut']:.3f}.")
    if binding:
        lines.append(f"binds: seeds whose test accuracy reaches {BIND_ACCURACY}, with the 95% Wilson interval of the "
                     f"rate; steps to bind: per seed, the first eval with val loss under {BIND_LOSS} ('-': never).")
    if copy:
        lines.append(f"copy drop: loss on the first minus the second copy of {first['copy_length']}-token validation "
                     "passages each followed by itself (positive: the model copies from that far back).")
    if long_range:
        lines.append(f"long-range / short-range loss: mean loss on the validation tokens that copying predicts (the "
                     f"token after the last earlier occurrence of the {first['long_range_n']} tokens before it) where "
                     f"that occurrence is >= W = {reference_window} back / < W back ({first['long_range_tokens']:,} / "
                     f"{first['short_range_tokens']:,} tokens); a long-range loss below local-only's comes from "
                     "distant tokens.")
    buckets = list(first.get('recall_accuracy_by_distance', {}))
    header = ["regime", "window W", "rank r"] + (["latent maps", "val loss at step 0"] if retrofit else [])
    header += ["val loss", "minus full (same seed)"] + (["within 1% at step"] if retrofit else []) + ["long-ctx gain"]
    header += ["copy drop"] if copy else []
    header += ["long-range loss", "long-range minus full", "short-range loss"] if long_range else []
    if recall:
        header += ["recall acc"] + [f"acc @ dist {b}" for b in buckets]
    header += ["binds", "95% interval", "steps to bind"] if binding else []
    header += ["tokens/s", "KV bytes/token", "KV vs full", "params"]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, s in summary.items():
        row = [s['regime'], '-' if s['regime'] in ('full', 'uniform') else s['dar_window'],
               '-' if s['regime'] in ('full', 'local') else s['dar_rank']]
        if retrofit:
            maps = '-' if s['regime'] in ('full', 'local') else 'random' if name in RANDOM_MAPS else 'calibrated'
            row += [maps, fmt(s['val_loss_start'], 4)]
        row += [fmt(s['val_loss'], 4), fmt(s['val_loss_minus_full'], 4)]
        if retrofit:
            row.append(', '.join('never' if it is None else str(it) for it in s['steps_to_within_1pct']))
        row.append(fmt(s['long_context_gain'], 4))
        if copy:
            row.append(fmt(s['copy_loss_drop'], 4))
        if long_range:
            row += [fmt(s[key], 4) for key in ('long_range_loss', 'long_range_loss_minus_full', 'short_range_loss')]
        if recall:
            row += [fmt(s['recall_accuracy'], 3)] + [fmt(s['recall_accuracy_by_distance'][b], 3) for b in buckets]
        if binding:
            b = s['binding']
            row += [f"{b['bound']}/{b['seeds']}", f"{b['interval'][0]:.2f}-{b['interval'][1]:.2f}",
                    ', '.join('-' if it is None else str(it) for it in b['steps_to_bind'])]
        speed = s['tokens_per_sec']
        row += [f"{speed[0]:,.0f}" if speed else '-', f"{s['kv_bytes_per_token']:,.0f}",
                f"{s['kv_bytes_per_token'] / full_kv:.2f}" if full_kv else '-', f"{s['params']:,}"]
        lines.append("| " + " | ".join(map(str, row)) + " |")
    with open(os.path.join(out_dir, 'results.md'), 'w', encoding='utf-8') as f:
        f.write('\n'.join(lines) + '\n')
    print('\n'.join(lines))
    plot_curves(results, names)
    evaluate.plot_loss_by_position(
        {name: (s['loss_by_position'],
                None if len(seed_list) < 2 else [per_position([r['loss_by_position'] for r in results
                                                               if r['name'] == name], f) for f in (min, max)])
         for name, s in summary.items()},
        reference_window, os.path.join(out_dir, 'loss_by_position.png'),
        'loss by position' + (' (mean, band: min-max over seeds)' if len(seed_list) > 1 else ''))
    plot_memory_quality(summary, results)
    if copy:
        plot_per_setting(summary, results, {'copy_loss_drop': None}, 'loss on copy 1 - loss on copy 2',
                         f"copy test: {first['copy_length']}-token passages, each followed by itself", 'copy_test.png')
    if long_range:
        plot_per_setting(summary, results, {'short_range_loss': f'copied from < W = {reference_window} back',
                                            'long_range_loss': f'copied from >= W = {reference_window} back'},
                         'validation loss on those tokens', "tokens copying predicts", 'long_range.png')
    print(f"wrote {out_dir}/results.json, results.md, val_loss.png, loss_by_position.png, memory_quality.png"
          + (", copy_test.png" if copy else "") + (", long_range.png" if long_range else ""))


def plot_curves(results, names):
    import matplotlib
    matplotlib.use('Agg')  # files only, no display needed
    import matplotlib.pyplot as plt
    fig, (ax, ax_diff) = plt.subplots(1, 2, figsize=(12, 4.5))
    band = ' (mean, band: min-max over seeds)' if len(seed_list) > 1 else ''
    full_curves = {r['seed']: r['curve'] for r in results if r['regime'] == 'full'}
    for name in names:
        rs = [r for r in results if r['name'] == name]
        first = 0 if retrofit else 1  # a retrofit's curve starts at the converted model; a scratch one's after step 0
        iters = [it for it, _ in rs[0]['curve']][first:]
        losses = [[loss for _, loss in r['curve']][first:] for r in rs]
        panels = [(ax, losses)]
        if full_curves:  # the same seed's full-attention loss subtracted: what the regime costs
            diffs = [[loss - f for loss, (_, f) in zip(l, full_curves[r['seed']][first:])] for l, r in zip(losses, rs)]
            panels.append((ax_diff, diffs))
        for axis, curves in panels:
            per_step = list(zip(*curves))
            line, = axis.plot(iters, [statistics.fmean(v) for v in per_step], label=name)
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
        if axis.get_legend_handles_labels()[0]:  # the difference panel is empty without a full-attention run
            axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, 'val_loss.png'), dpi=120)
    plt.close(fig)


def plot_memory_quality(summary, results):
    """KV-cache bytes per token against quality: the mean of every setting (error bar: std over seeds),
    and every seed a small point beside it."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    first = results[0]
    metric = 'recall_accuracy' if 'recall_accuracy' in first else 'val_loss'
    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {'full': 's', 'dar': 'o', 'uniform': '^', 'local': 'v'}
    for regime in REGIMES:
        points = [(name, s) for name, s in summary.items() if s['regime'] == regime]
        if not points:
            continue
        xs = [s['kv_bytes_per_token'] for _, s in points]
        ys = [s[metric][0] for _, s in points]
        errs = [s[metric][1] or 0 for _, s in points]
        line = ax.errorbar(xs, ys, yerr=errs, fmt=markers[regime], capsize=3, label=regime)[0]
        seeds = [(s['kv_bytes_per_token'] * 1.06, r[metric]) for name, s in points for r in results if r['name'] == name]
        ax.scatter(*zip(*seeds), s=9, marker=markers[regime], color=line.get_color(), alpha=0.5)
        for (name, _), x, y in zip(points, xs, ys):
            ax.annotate(name.partition('-')[2], (x, y), textcoords='offset points', xytext=(4, 4), fontsize=7)
    if metric == 'recall_accuracy':
        for key, style in (('recall_shortcut', ':'), ('recall_chance', '--')):
            ax.axhline(first[key], color='gray', linestyle=style, linewidth=0.8)
            ax.text(0.99, first[key], key.split('_')[1], transform=ax.get_yaxis_transform(), ha='right',
                    va='bottom', fontsize=8, color='gray')
    ax.set_xscale('log')
    ax.set_xlabel('KV-cache bytes per token at the training context (log scale)')
    ax.set_ylabel('recall accuracy (test)' if metric == 'recall_accuracy' else 'final validation loss')
    ax.set_title('memory against quality (mean ± std over seeds; small: each seed)', fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, 'memory_quality.png'), dpi=120)
    plt.close(fig)


def plot_per_setting(summary, results, metrics, ylabel, title, filename):
    """metrics ({key: label, or None for no legend}) of every setting side by side: the mean a bar, every seed a
    point."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    names, width = list(summary), 0.8 / len(metrics)
    fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(names) * len(metrics) + 2), 3.5))
    for j, (key, label) in enumerate(metrics.items()):
        xs = [i + (j - (len(metrics) - 1) / 2) * width for i in range(len(names))]
        ax.bar(xs, [summary[n][key][0] if summary[n][key] else 0 for n in names], width, label=label,
               color=plt.cm.Pastel1.colors[j] if len(metrics) > 1 else 'lightsteelblue')
        for x, name in zip(xs, names):
            values = [r[key] for r in results if r['name'] == name and r[key] is not None]
            ax.scatter([x] * len(values), values, color='black', s=10, zorder=3)
    ax.axhline(0, color='gray', linewidth=0.8)
    ax.set_xticks(range(len(names)), names, rotation=30, ha='right', fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title} (bar: mean, dots: seeds)", fontsize=9)
    ax.grid(alpha=0.3, axis='y')
    if len(metrics) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, filename), dpi=120)
    plt.close(fig)


if __name__ == '__main__':
    with tqdm(runs, unit='run', desc='compare') as bar:
        for run in bar:
            bar.set_description(f"compare: {run.setting.name} seed {run.seed}")
            train(run, bar)
    write_report([summarize(run) for run in tqdm(runs, unit='run', desc='evaluate')])
