"""
What a trained run does with distant context, measured on fixed sequences (the same ones for
every run of a dataset):

    python evaluate.py --out_dir=out-dar                 # its checkpoint, on its own dataset
    python evaluate.py --out_dir=out-full --window=64    # the long-context gain against W = 64

- loss by position: the mean loss at every position of the context over n_sequences fixed
  validation sequences. A model that uses tokens more than W back keeps improving past W.
- long-context gain: mean loss at positions >= 4W minus mean loss at positions < W (negative:
  the model gains from long context). W is the run's window unless --window is given.
- copy test (token streams): n_sequences fixed validation passages of copy_length tokens (default
  block_size // 2), each followed by itself; copy_loss_drop is the mean loss on the first copy minus
  that on the second (the first COPY_SKIP tokens of each left out). A model that reaches
  copy_length tokens back predicts the second copy far better (induction); a window W <
  copy_length cannot, and DAR only through its latents.
- on a recall dataset (prepare.py --synthetic=recall): recall accuracy on the test split
  (argmax at the answers), overall and by key-to-query distance, next to chance and the
  shortcut of a model that never binds keys to values.

Writes <out_dir>/eval.json and <out_dir>/loss_by_position.png. compare.py runs the same
functions for every run of a comparison.
"""
import hashlib
import json
import os
import sys
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

from configurator import check_device, configure
from data import IGNORE, Dataset, check_vocabulary
from model import GPT, GPTConfig
from storage import load_checkpoint, write_atomically

DISTANCE_BUCKETS = 4  # recall accuracy by key-to-query distance: equal-width buckets
EVAL_VERSION = 3  # what eval.json holds; a cached result of another version is computed again
COPY_SKIP = 4  # tokens at the start of each copy the copy test leaves out: no copy can predict them yet
LONG_RANGE_N = 3  # a long- or short-range token follows an earlier occurrence of the LONG_RANGE_N tokens before it


def load_run(out_dir, device='cpu'):
    """(model in eval mode, checkpoint dict) of out_dir/ckpt.pt."""
    path = os.path.join(out_dir, 'ckpt.pt')
    if not os.path.exists(path):
        raise SystemExit(f"{path} not found: train a model first (python train.py --out_dir={out_dir})")
    ckpt = load_checkpoint(path)
    model = GPT(GPTConfig(**ckpt['model_args']))
    model.load_state_dict(ckpt['model'])
    return model.to(device).eval(), ckpt


def token_logits(model, x, n_tokens):
    """The logits of a forward over x for the dataset's n_tokens ids only: the model's vocabulary is padded past
    them (to a multiple of 64), and a padding id is no token, so it is never scored as one."""
    return model(x)[0][..., :n_tokens]


def token_losses(model, x, y, n_tokens):
    """The per-token loss of a forward over x, nan where y is IGNORE."""
    logits = token_logits(model, x, n_tokens)
    loss = F.cross_entropy(logits.float().transpose(1, 2), y, ignore_index=IGNORE, reduction='none')
    return loss.masked_fill(y == IGNORE, float('nan'))


def long_context_gain(loss_by_position, window):
    """mean loss at positions >= 4W minus mean loss at positions < W; None where undefined."""
    if not window or len(loss_by_position) <= 4 * window:
        return None
    near = [v for v in loss_by_position[:window] if v is not None]
    far = [v for v in loss_by_position[4 * window:] if v is not None]
    return float(np.mean(far) - np.mean(near)) if near and far else None


def check_copy_length(length, block_size):
    """A ValueError unless a passage of length tokens and its copy fit the context of block_size."""
    if not COPY_SKIP < length <= block_size // 2:
        raise ValueError(f"copy_length must be in ({COPY_SKIP}, block_size // 2 = {block_size // 2}], got {length}: "
                         f"a passage and its copy fill at most the context, and the first {COPY_SKIP} tokens of each "
                         "are left out; choose one in that range, or leave it unset")


def copy_test(model, data, length, n_sequences=128, batch_size=8, autocast=nullcontext()):
    """Mean loss on the first and the second copy of fixed validation passages of `length` tokens,
    each followed by itself, and copy_loss_drop = first - second (see the top of this file)."""
    device = next(model.parameters()).device
    check_copy_length(length, model.config.block_size)
    first, second = [], []
    for x, _ in data.fixed_batches('val', length, n_sequences, batch_size):
        twice = torch.cat([x, x], 1).to(device)  # (B, 2L): passage, passage
        with autocast:
            loss = token_losses(model, twice[:, :-1], twice[:, 1:], data.vocab_size)  # loss[:, t]: of token t + 1
        first.append(loss[:, COPY_SKIP - 1:length - 1].float().cpu())
        second.append(loss[:, length + COPY_SKIP - 1:].float().cpu())
    first, second = torch.cat(first).mean().item(), torch.cat(second).mean().item()
    return {'copy_length': length, 'copy_loss_first': first, 'copy_loss_second': second,
            'copy_loss_drop': first - second}


def copy_distances(tokens, n=LONG_RANGE_N):
    """For a sequence of len(tokens) - 1 targets (target t is tokens[t + 1], predicted from tokens[:t + 1]), how
    far back copying finds each: t - s for the last s < t at which the n tokens ending at s equal the n ending at t,
    when the token after them, tokens[s + 1], is the target; 0 where copying does not predict it (no earlier
    occurrence, or another token followed the last one)."""
    last, distances = {}, [0] * (len(tokens) - 1)
    for t in range(n - 1, len(tokens) - 1):
        ngram = tuple(tokens[t - n + 1:t + 1])
        s = last.get(ngram)
        if s is not None and tokens[s + 1] == tokens[t + 1]:
            distances[t] = t - s
        last[ngram] = t
    return distances


def copy_masks(x, y, window):
    """(long, short): boolean masks over the targets y of inputs x (a stream's (B, T) batch) of the tokens copying
    predicts from >= window back and from < window back (copy_distances)."""
    distances = torch.tensor([copy_distances(row) for row in torch.cat([x, y[:, -1:]], 1).tolist()])
    return distances >= window, (distances > 0) & (distances < window)


def recall_baselines(n_pairs, n_values):
    """Chance (a uniform guess among the values), and the shortcut: a model that never binds a
    key to its value but guesses among the values not yet asked for gets query j (of P) right
    with probability 1 / (P - j)."""
    return {'chance': 1 / n_values, 'shortcut': float(np.mean([1 / (n_pairs - j) for j in range(n_pairs)]))}


def answer_distances(x, y):
    """Key-to-query distance of every answer (y != IGNORE), in the order of y's nonzero():
    the query key is the input token at the answer's position, its key the first earlier
    occurrence of that token."""
    b, t = (y != IGNORE).nonzero(as_tuple=True)
    same = x[b] == x[b, t][:, None]  # (answers, T)
    return t - same.int().argmax(dim=1)


@torch.no_grad()
def evaluate(model, data, n_sequences=128, batch_size=8, window=None, autocast=nullcontext(), copy_length=None):
    """Loss by position on data's val split, long-context gain, the copy test and the long-range tokens on a
    token stream, and on a recall dataset the recall accuracy on its test split. Returns a dict for results.json."""
    block_size, device = model.config.block_size, next(model.parameters()).device
    window = model.config.window if window is None else window
    sums, counts = torch.zeros(block_size, dtype=torch.float64), torch.zeros(block_size, dtype=torch.float64)
    copied = {'long_range': [0.0, 0], 'short_range': [0.0, 0]}  # loss sum and count of each kind of copied token
    for x, y in data.fixed_batches('val', block_size, n_sequences, batch_size):
        with autocast:
            loss = token_losses(model, x.to(device), y.to(device), data.vocab_size).double().cpu()
        sums += loss.nan_to_num().sum(0)
        counts += (~loss.isnan()).sum(0)
        if data.format == 'stream' and window:
            for kind, mask in zip(copied, copy_masks(x, y, window)):
                copied[kind][0] += loss[mask].sum().item()
                copied[kind][1] += int(mask.sum())
    by_position = [s / c if c else None for s, c in zip(sums.tolist(), counts.tolist())]
    result = {'loss_by_position': by_position, 'long_context_window': window,
              'long_context_gain': long_context_gain(by_position, window)}
    if data.format == 'stream' and window:
        result['long_range_n'] = LONG_RANGE_N
        for kind, (total, n) in copied.items():
            result.update({f'{kind}_loss': total / n if n else None, f'{kind}_tokens': n})
    if data.format == 'stream' and block_size // 2 > COPY_SKIP:
        result.update(copy_test(model, data, copy_length or block_size // 2, n_sequences, batch_size, autocast))
    task = data.meta.get('task') or {}
    if task.get('name') == 'recall':
        result.update(recall_accuracy(model, data, task, block_size, batch_size, autocast))
    return result


def recall_accuracy(model, data, task, block_size, batch_size, autocast):
    device = next(model.parameters()).device
    correct, distances = [], []
    for x, y in data.fixed_batches('test', block_size, data.meta['test_examples'], batch_size):
        x, y = x.to(device), y.to(device)
        with autocast:
            logits = token_logits(model, x, data.vocab_size)
        answers = y != IGNORE
        correct.append((logits.argmax(-1)[answers] == y[answers]).cpu())
        distances.append(answer_distances(x, y).cpu())
    correct, distances = torch.cat(correct).float(), torch.cat(distances)
    lo, hi = task['min_distance'], block_size
    edges = np.unique(np.linspace(lo, hi, DISTANCE_BUCKETS + 1).round().astype(int))
    by_distance = {}
    for a, b in zip(edges[:-1], edges[1:]):
        inside = (distances >= a) & (distances < b)
        if inside.any():
            by_distance[f'{a}-{b - 1}'] = correct[inside].mean().item()
    n_values = task['value_ids'][1] - task['value_ids'][0]
    return {'recall_accuracy': correct.mean().item(), 'recall_accuracy_by_distance': by_distance,
            'recall_answers': len(correct), **{f'recall_{k}': v for k, v in
                                               recall_baselines(task['n_pairs'], n_values).items()}}


PLOT_BINS = 40  # log-spaced position bins: per-position losses are noisy (one token per sequence)


def log_binned(values):
    """(bin centres, means) of values (None: no loss there) in log-spaced bins of position."""
    edges = np.unique(np.geomspace(1, len(values) + 1, PLOT_BINS + 1).astype(int))
    centres, means = [], []
    for a, b in zip(edges[:-1], edges[1:]):  # positions a..b-1, counted from 1
        inside = [v for v in values[a - 1:b - 1] if v is not None]
        if inside:
            centres.append(float(np.sqrt(a * (b - 1))))
            means.append(float(np.mean(inside)))
    return centres, means


def plot_loss_by_position(curves, window, path, title):
    """curves: {label: (mean per position, optional (low, high) band)}, drawn in log-spaced bins of
    position; with a 'full' curve, a second panel shows every curve minus full's (same sequences)."""
    import matplotlib
    matplotlib.use('Agg')  # files only, no display needed
    import matplotlib.pyplot as plt
    reference = curves.get('full', (None,))[0]
    fig, axes = plt.subplots(1, 2 if reference else 1, figsize=(12 if reference else 7, 4.5), squeeze=False)
    colors = plt.cm.tab20.colors if len(curves) > 10 else plt.cm.tab10.colors  # no colour used twice
    for (label, (mean, band)), color in zip(curves.items(), colors):
        pos, binned = log_binned(mean)
        axes[0, 0].plot(pos, binned, label=label, linewidth=1.2, color=color, marker='.', markersize=3)
        if band is not None:
            axes[0, 0].fill_between(pos, log_binned(band[0])[1], log_binned(band[1])[1], color=color, alpha=0.2)
        if reference:
            diff = [None if v is None or f is None else v - f for v, f in zip(mean, reference)]
            axes[0, 1].plot(*log_binned(diff), label=label, linewidth=1.2, color=color, marker='.', markersize=3)
    for ax in axes[0]:
        if window:
            ax.axvline(window, color='gray', linestyle='--', linewidth=0.8)
            ax.text(window, 1.0, f' W={window}', transform=ax.get_xaxis_transform(), va='top', fontsize=9,
                    color='gray')
        ax.set_xscale('log')
        ax.set_xlabel('position in the context (tokens seen, log scale)')
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0, 0].set_ylabel('mean validation loss')
    axes[0, 0].set_title(title, fontsize=10)
    if reference:
        axes[0, 1].axhline(0, color='gray', linewidth=0.8)
        axes[0, 1].set_ylabel('mean validation loss - full attention')
        axes[0, 1].set_title('difference to full attention (the same sequences)', fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 24), b''):
            digest.update(chunk)
    return digest.hexdigest()


def evaluate_run(run_dir, dataset=None, n_sequences=128, batch_size=8, window=None, device='cpu', copy_length=None):
    """evaluate() on run_dir's checkpoint; kept in run_dir/eval.json and reused while the
    checkpoint (its bytes), the dataset and the settings are the same."""
    model, ckpt = load_run(run_dir, device)
    dataset = dataset or ckpt['config']['dataset']
    data = Dataset(os.path.join('data', dataset))
    check_vocabulary(data.meta, data.dir, ckpt.get('vocabulary'), os.path.join(run_dir, 'ckpt.pt'))
    if copy_length is not None:  # checked before a result is reused, and never silently ignored
        if data.format != 'stream':
            raise SystemExit(f"--copy_length sets the copy test, which runs on token streams; {dataset} holds "
                             "examples, so leave it unset")
        check_copy_length(copy_length, model.config.block_size)
    key = {'version': EVAL_VERSION, 'checkpoint_sha256': file_sha256(os.path.join(run_dir, 'ckpt.pt')),
           'dataset': dataset, 'dataset_meta': data.meta,
           'n_sequences': n_sequences, 'window': window, 'copy_length': copy_length}
    path = os.path.join(run_dir, 'eval.json')
    if os.path.exists(path):
        with open(path, encoding='utf-8') as f:
            cached = json.load(f)
        if cached.get('key') == key:
            return cached['result']
    autocast = nullcontext()
    if device.startswith('cuda') and ckpt['config']['dtype'] == 'bfloat16':
        autocast = torch.autocast('cuda', dtype=torch.bfloat16)
    if data.vocab_size > model.config.vocab_size:
        raise SystemExit(f"dataset {dataset} has {data.vocab_size} token ids, the model of {run_dir} only "
                         f"{model.config.vocab_size}: evaluate it on the dataset it was trained on")
    for split in ('val', 'test') if (data.meta.get('task') or {}).get('name') == 'recall' else ('val',):
        data.check(split, model.config.block_size, fix="the model's context is fixed: evaluate it on data of longer "
                                                       "sequences, such as the dataset it was trained on")
    result = evaluate(model, data, n_sequences, batch_size, window, autocast, copy_length)
    write_atomically(path, lambda f: json.dump({'key': key, 'result': result}, f), mode='w')
    return result


def main():
    settings = dict(out_dir='out', dataset='', n_sequences=128, batch_size=8, window=None, copy_length=None,
                    device='cuda' if torch.cuda.is_available() else 'cpu')
    configure(settings, sys.argv[1:])
    check_device(settings['device'])
    for name in ('n_sequences', 'batch_size', 'window'):  # copy_length: checked against the model's context
        if settings[name] is not None and settings[name] < 1:
            raise SystemExit(f"--{name} must be at least 1, got {settings[name]}")
    try:
        result = evaluate_run(settings['out_dir'], settings['dataset'] or None, settings['n_sequences'],
                              settings['batch_size'], settings['window'], settings['device'], settings['copy_length'])
    except ValueError as e:
        raise SystemExit(str(e)) from None
    window = result['long_context_window']
    curve = result['loss_by_position']
    print(f"loss by position ({settings['out_dir']}): first {curve[0]:.4f}, last {curve[-1]:.4f}"
          if curve[0] is not None and curve[-1] is not None else "loss by position: see eval.json")
    gain = result['long_context_gain']
    print(f"long-context gain (mean loss at >= 4W minus < W, W={window}): "
          + (f"{gain:+.4f}" if gain is not None else "undefined (needs a window and block_size > 4W)"))
    if 'copy_loss_drop' in result:
        print(f"copy test ({result['copy_length']}-token passages, each followed by itself): loss "
              f"{result['copy_loss_first']:.4f} on the first copy, {result['copy_loss_second']:.4f} on the second, "
              f"drop {result['copy_loss_drop']:+.4f}")
    if 'long_range_loss' in result:
        losses = {kind: '-' if result[f'{kind}_loss'] is None else f"{result[f'{kind}_loss']:.4f}"
                  for kind in ('long_range', 'short_range')}
        print(f"tokens copying predicts (after an earlier occurrence of the {result['long_range_n']} tokens before "
              f"them), loss: {losses['long_range']} on the {result['long_range_tokens']} whose occurrence is >= "
              f"W={window} back, {losses['short_range']} on the {result['short_range_tokens']} within W")
    if 'recall_accuracy' in result:
        print(f"recall accuracy {result['recall_accuracy']:.3f} over {result['recall_answers']} answers "
              f"(chance {result['recall_chance']:.3f}, shortcut without binding {result['recall_shortcut']:.3f})")
        for bucket, acc in result['recall_accuracy_by_distance'].items():
            print(f"  distance {bucket}: {acc:.3f}")
    plot_loss_by_position({settings['out_dir']: (curve, None)}, window,
                          os.path.join(settings['out_dir'], 'loss_by_position.png'), 'loss by position')
    print(f"wrote {settings['out_dir']}/eval.json, loss_by_position.png")


if __name__ == '__main__':
    main()
