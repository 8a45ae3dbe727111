"""
The Python half of gpu_check.sh (read that first), in two parts:

    python gpu_check.py steps OUT [--dry]      # -> OUT/steps.json
    python gpu_check.py report OUT [--readme]  # -> OUT/summary.md (--readme: also README.md's GPU section)

steps: for each regime x attention path (sdpa, fused, flex), one bf16-autocast training step at the pythia-70m shape
(T=2048, batch 8; on CUDA with PyTorch's math attention kernel excluded): time, peak memory, ops
dispatched (on a GPU about one kernel launch each), host syncs, and the attention's error against
`naive` (its output and its q, k, v and latent map gradients: flex's backward is checked only here, the CPU
has none); then cached decoding against the full forward, with the dynamic cache, the static one, and
the static one compiled. --dry: the same at tiny sizes on the CPU (the test suite runs it).
"""

import contextlib
import json
import math
import os
import statistics
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from model import ATTENTION, ATTN_IMPLS, GPT, REGIMES, GPTConfig, regime_settings


class OpCounter(TorchDispatchMode):
    """Counts the ops that run (eager, on a GPU, about one kernel launch each) and names those that make
    the host wait for the device, which on a GPU drains the queue of launched kernels."""
    SYNCING = ('_local_scalar_dense', 'nonzero', 'masked_select', 'is_nonzero', 'equal', 'allclose', '_unique2')

    def __init__(self):
        super().__init__()
        self.ops, self.syncs = 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        if func.overloadpacket.__name__ in self.SYNCING:
            self.syncs.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def sizes(dry):
    """(device, model shape, T, batch, W, r)."""
    if dry:
        return 'cpu', dict(name='tiny', n_layer=1, n_head=2, n_embd=32), 40, 1, 16, 4
    return 'cuda', dict(name='pythia-70m'), 2048, 8, 256, 16


def build(shape, **settings):
    torch.manual_seed(0)
    return GPT(GPTConfig.from_preset(**shape, **settings))


def sync(device):
    if device == 'cuda':
        torch.cuda.synchronize()


TOLERANCE = 0.03  # of attention_error: bf16 keeps 8 bits of mantissa, and the reference is float32


def attention_error(impl, regime, device, T, B, W, r):
    """Largest error of impl's output and its q, k, v and latent map gradients against naive in float32, each
    relative to its largest reference value, on bf16 inputs at the pythia-70m head shape."""
    window, rank = regime_settings(regime, W, r)
    window = None if regime == 'full' else window
    g = torch.Generator(device='cpu').manual_seed(0)
    H, d = (2, 16) if device == 'cpu' else (8, 64)
    q, k, v = (torch.randn(B, H, T, d, generator=g).to(device, torch.bfloat16) for _ in range(3))
    maps = None
    if rank:
        down = torch.linalg.qr(torch.randn(H, d, rank, generator=g))[0]
        maps = tuple(t.to(device, torch.bfloat16) for t in (down, down.transpose(-2, -1), down, down.transpose(-2, -1)))
    dout = torch.randn(B, H, T, d, generator=g).to(device, torch.bfloat16)

    def out_and_grads(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v, *(maps or ()))]
        out = fn(*leaves[:3], window, tuple(leaves[3:]) or None)
        out.backward(dout.to(dtype))
        return [out.detach().float()] + [t.grad.float() for t in leaves]

    errors = [(a - b).abs().max() / b.abs().max() for a, b in
              zip(out_and_grads(ATTENTION[impl], torch.bfloat16), out_and_grads(ATTENTION['naive'], torch.float32))]
    return max(errors).item()


def show(value, spec):
    """value formatted by spec, or '-' where it was not measured (None)."""
    return '-' if value is None else format(value, spec)


def mib(n):
    """n bytes in MiB, or '-' where it was not measured (None)."""
    return show(None if n is None else n / 2**20, '.0f')


def train_table(bench):
    """Markdown lines of bench.py's training grid (its JSON): every case, then the path 'auto' picks."""
    lines = ["x full: against full attention's fastest path (time) and its smallest peak (memory) at the same T; "
             "(auto): the path attn_impl='auto' picks there.", '',
             '| T | batch | regime | path | step ms | x full | peak MiB | x full |', '|---' * 8 + '|']
    order = lambda r: (r['T'], REGIMES.index(r['regime']), ATTN_IMPLS.index(r['path']))
    for r in sorted(bench['rows'], key=order):
        cells = f"| {r['T']} | {r['batch']} | {r['regime']} | {r['path']}{' (auto)' * r['auto']} |"
        lines.append(f"{cells} failed: {r['error'][:200]} | | | |" if 'error' in r else
                     f"{cells} {r['seconds'] * 1e3:,.1f} | {show(r['time_vs_full'], '.2f')} | {mib(r['peak_bytes'])} | "
                     f"{show(r['memory_vs_full'], '.2f')} |")
    regimes = list(next(iter(bench['auto'].values())))
    lines += ['', "The path attn_impl='auto' picks:", '', '| T | ' + ' | '.join(regimes) + ' |',
              '|---|' + '---|' * len(regimes)]
    return lines + [f"| {T} | " + ' | '.join(picks.values()) + ' |' for T, picks in bench['auto'].items()]


def targets_table(targets):
    """Markdown lines of bench.py's reading of issue 22's decode targets (its JSON's targets)."""
    return ["Issue 22's targets at context 32768 (the best matching row; -: not measured in this run):", '',
            '| target | at least | measured | met |', '|---|---|---|---|'] + [
        f"| {t['target']} | {t['at_least']:,} | {show(t['measured'], ',.2f')} | "
        f"{'-' if t['met'] is None else 'yes' if t['met'] else 'no'} |" for t in targets]


def failed(row, error):
    """A first GPU run: what broke is noted in its row, and the rest still runs."""
    print(f"FAILED {row}: {type(error).__name__}: {error}", flush=True)
    return {**row, 'error': f"{type(error).__name__}: {error}"[:800]}


def training_step(regime, impl, dry):
    device, shape, T, B, W, r = sizes(dry)
    window, rank = regime_settings(regime, W, r)
    m = build(shape, dar_window=window, dar_rank=rank, attn_impl=impl).to(device)
    idx = torch.randint(0, m.config.vocab_size, (B, T), device=device)

    def step():
        m.zero_grad(set_to_none=True)
        with torch.autocast(device, torch.bfloat16):
            loss = m(idx, idx)[1]
        loss.backward()

    step()  # warm-up
    times = []
    for _ in range(1 if dry else 3):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = None
    if device == 'cuda':
        torch.cuda.reset_peak_memory_stats()
        step()
        peak = torch.cuda.max_memory_allocated()
    error = attention_error(impl, regime, device, T, B if dry else 2, W, r)
    counter = OpCounter()
    # flex on CUDA is a compiled kernel, not dispatched ops; compiled under a dispatch mode, dynamo traces
    # flex_attention's unfused fallback and fails (the first H200 run), so it is not counted
    if not (impl == 'flex' and device == 'cuda'):
        with counter:
            step()
    else:
        counter.ops, counter.syncs = None, ['not counted: a compiled kernel']
    return dict(step_s=statistics.median(times), peak_bytes=peak, ops=counter.ops, host_syncs=counter.syncs,
                error_vs_naive=error)


def training_steps(dry):
    rows = []
    for regime in REGIMES:
        for impl in ('sdpa', 'fused') if dry else ('sdpa', 'fused', 'flex'):  # flex: no backward on the CPU
            if impl == 'flex':
                # A compiled function recompiles for at most recompile_limit shapes; past that, dynamo silently runs
                # flex_attention's unfused eager fallback (slow, its scores in memory). This loop's regimes and
                # shapes would reach it, a training run (one shape) never does: each case starts as that run does.
                torch._dynamo.reset()
            row = dict(regime=regime, impl=impl)
            try:
                rows.append({**row, **training_step(regime, impl, dry)})
                if rows[-1]['error_vs_naive'] > TOLERANCE:
                    print(f"FAILED {row}: differs from naive by {rows[-1]['error_vs_naive']:.1e} (tolerance "
                          f"{TOLERANCE})", flush=True)
            except Exception as e:
                rows.append(failed(row, e))
            print(json.dumps(rows[-1]), flush=True)
    return rows


@torch.no_grad()
def decode_error(m, idx, n_prompt, kind, device):
    """Largest logit error / largest logit of a prompt and then decode steps from a cache, against one full
    forward, under bf16 autocast."""
    B, n = idx.shape
    with torch.autocast(device, torch.bfloat16):
        ref = m(idx)[0].float()
        cache = m.new_cache(B, n, static=kind != 'dynamic')
        step = m
        if kind == 'static compiled':  # on CUDA: CUDA graphs of the eager kernels
            torch._dynamo.reset()
            step = torch.compile(m, fullgraph=True, dynamic=False,
                                 backend='cudagraphs' if device == 'cuda' else 'aot_eager')
        got = [m(idx[:, :n_prompt], cache=cache)[0].float()]
        got += [step(idx[:, t:t + 1], cache=cache)[0].float() for t in range(n_prompt, n)]
    return ((torch.cat(got, 1) - ref).abs().max() / ref.abs().max()).item()


def decode_checks(dry):
    device, shape, T, B, W, r = sizes(dry)
    rows = []
    for regime in REGIMES:  # two layers: the second reads what the first wrote into the cache
        window, rank = regime_settings(regime, W, r)
        m = build({**shape, 'n_layer': 2}, dar_window=window, dar_rank=rank).to(device).eval()
        idx = torch.randint(0, m.config.vocab_size, (B, W + 29), device=device)
        for kind in ('dynamic', 'static', 'static compiled'):  # the prompt ends past the window, the steps go on
            row = dict(regime=regime, cache=kind)
            try:
                rows.append({**row, 'relative_error': decode_error(m, idx, W + 5, kind, device)})
            except Exception as e:
                rows.append(failed(row, e))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def run_steps(out, dry):
    device = sizes(dry)[0]
    if device == 'cuda' and not torch.cuda.is_available():
        raise SystemExit("gpu_check.py steps: no CUDA device here; --dry runs the same steps on the CPU")
    backend = torch.nn.attention.SDPBackend
    no_math = [backend.FLASH_ATTENTION, backend.EFFICIENT_ATTENTION, backend.CUDNN_ATTENTION]
    with torch.nn.attention.sdpa_kernel(no_math) if device == 'cuda' else contextlib.nullcontext():
        result = dict(machine=torch.cuda.get_device_name() if device == 'cuda' else 'CPU (dry run)',
                      torch=torch.__version__, training_steps=training_steps(dry), decode=decode_checks(dry))
    with open(os.path.join(out, 'steps.json'), 'w') as f:
        json.dump(result, f, indent=1)


def load(out, name):
    """The JSON a stage wrote into OUT, None if it wrote none."""
    path = os.path.join(out, name)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except ValueError:
        raise SystemExit(f"{path} is not complete JSON (the stage that writes it was cut off); run gpu_check.sh "
                         "again, or delete that file to report the rest") from None


def report(out):
    """The markdown of what OUT holds: the README's GPU section is this, written by this script."""
    lines = []
    steps = load(out, 'steps.json')
    tests = read_lines(out, 'tests.txt')
    if steps:
        lines += [f"Machine: {steps['machine']}, torch {steps['torch']}; command: `./gpu_check.sh` "
                  f"(output folder `{os.path.basename(os.path.normpath(out))}`).", '']
    if tests:
        lines += [f"Test suite on this machine: `{tests[-1]}`", '']
    if steps:
        lines += ['One training step (bf16 autocast; pythia-70m shape, T=2048, batch 8 on CUDA), and the '
                  'attention against `naive` (float32):', '',
                  '| regime | path | step ms | peak MiB | ops | host syncs | error vs naive |',
                  '|---|---|---|---|---|---|---|']
        for s in steps['training_steps']:
            if 'error' in s:
                lines.append(f"| {s['regime']} | {s['impl']} | failed: {s['error'][:200]} | | | | |")
                continue
            lines.append(f"| {s['regime']} | {s['impl']} | {s['step_s'] * 1000:.1f} | {mib(s['peak_bytes'])} | "
                         f"{s['ops']} | {len(s['host_syncs']) if s['ops'] is not None else '-'} | "
                         f"{s['error_vs_naive']:.1e}{' (over tolerance)' * (s['error_vs_naive'] > TOLERANCE)} |")
        lines += ['', 'Cached decoding against the full forward (largest logit error / largest logit):', '',
                  '| regime | ' + ' | '.join(dict.fromkeys(d['cache'] for d in steps['decode'])) + ' |',
                  '|---|---|---|---|']
        for regime in dict.fromkeys(d['regime'] for d in steps['decode']):
            lines.append(f'| {regime} | ' + ' | '.join(f"{d['relative_error']:.1e}" if 'error' not in d else
                                                        f"failed: {d['error'][:120]}"
                                                        for d in steps['decode'] if d['regime'] == regime) + ' |')
    train = load(out, 'train_bench.json')
    if train:
        lines += ['', f"A training step at each length, `bench.py --section=train` ({train['tokens']:,} tokens a "
                      f"step, {train['dtype']}{' autocast' * train['autocast']}, W={train['dar_window']}, "
                      f"r={train['dar_rank']}; median of {train['repeats']}):", '', *train_table(train)]
    for name, bench in decode_benches(out):
        lines += ['', f"Decode, `bench.py --section=decode` ({name}), {bench['dtype']}, W={bench['dar_window']}, "
                      f"r={bench['dar_rank']}; x full: against full attention's best mode and form in the same file "
                      "(a mode followed by a form: split_decode.py's decode attention, not model.py's reference); "
                      "error: a step's logits against the eager reference step's:", '',
                  '| batch | context | case | mode | prefill tok/s | ms/step | decode tok/s | x full | of ceiling | '
                  'kernels | busy ms | KV MiB | error |', '|---|---|---|---|---|---|---|---|---|---|---|---|---|']
        lines += [f"| {r['batch']} | {r['context']} | {r['case']} | {mode_label(r)} | "
                  f"{show(r['prefill_tok_s'], ',.0f')} | "
                  f"{1e3 * r['batch'] / r['decode_tok_s']:.2f} | {r['decode_tok_s']:,.0f} | "
                  f"{r['decode_vs_full']:.2f} | "
                  f"{show(r.get('of_ceiling'), '.0%')} | {show(r.get('ops_per_step'), 'd')} | "
                  f"{show(r.get('device_busy_ms'), '.2f')} | {r['kv_bytes'] / 2**20:.0f} | "
                  f"{show(r.get('logit_error'), '.1e')} |" for r in bench['rows']]
        lines += [f"| budget {bench['kv_budget_gib']} GiB: {r['batch']} | {bench['budget_context']} | {r['case']} | "
                  f"{mode_label(r)} | - | - | {r['decode_tok_s']:,.0f} | {r['decode_vs_full']:.2f} | | | | "
                  f"{r['kv_bytes'] / 2**20:.0f} | {show(r.get('logit_error'), '.1e')} |" for r in bench['budget_rows']]
        if bench.get('targets'):
            lines += ['', f"In {name}:", *targets_table(bench['targets'])]
        lines += [f"\nFailed: {f}" for f in bench.get('failed', [])]
    for name, title in (('train_results.json', 'The four regimes on the plays, trained briefly'),
                        ('code_results.json', 'The regimes on the Python standard library (long-range loss: tokens '
                                              'copying predicts from >= W back; short-range: < W back)')):
        train = load(out, name)
        if train:
            lines += ['', f"{title} (`compare.py` settings in log.txt):", '',
                      '| run | seed | val loss | copy drop | long-range loss | short-range loss | tokens/s |',
                      '|---|---|---|---|---|---|---|']
            losses = ('val_loss', 'copy_loss_drop', 'long_range_loss', 'short_range_loss')
            lines += [f"| {r['name']} | {r.get('seed', '-')} | " + ' | '.join(show(r.get(k), '.4f') for k in losses) +
                      f" | {show(r.get('tokens_per_sec'), ',.0f')} |"
                      for r in train['runs']]
    return '\n'.join(lines) + '\n'


def read_lines(out, name):
    path = os.path.join(out, name)
    return open(path, encoding='utf-8').read().strip().splitlines() if os.path.exists(path) else []


def decode_benches(out):
    """(file name, bench.py's decode JSON, every row with its mode and decode attention) of each decode benchmark
    in out; files of the first H200 run (decode_eager.json, decode_graphs.json) predate the mode column, and
    files before issue 22's item 3 the attention column (their step is the reference)."""
    for name, mode in (('decode.json', None), ('decode_compiled.json', None), ('decode_eager.json', 'eager'),
                       ('decode_graphs.json', 'cudagraphs')):
        bench = load(out, name)
        if bench:
            for r in bench['rows'] + bench['budget_rows']:
                r.setdefault('mode', mode)
                r.setdefault('attn', 'reference')
            yield name, bench


def mode_label(row):
    """A decode row's mode, and its decode attention where that is not the reference: 'compiled, flex'."""
    return row['mode'] if row['attn'] == 'reference' else f"{row['mode']}, {row['attn']}"


def headline(out, readme_dir='.'):
    """The README's few lines of what OUT holds: DAR against full attention, each way of running the decode
    step, and where the whole report is."""
    steps, tests = load(out, 'steps.json'), read_lines(out, 'tests.txt')
    summary = os.path.relpath(os.path.join(out, 'summary.md'), readme_dir)
    lines = [f"{steps['machine'] + ', torch ' + steps['torch'] if steps else 'A GPU'}: `./gpu_check.sh`, the "
             f"whole report in [{summary}]({summary})" + (f"; tests: `{tests[-1]}`" if tests else '') + '.', '']
    cells = {}  # (what, mode) -> 'DAR tok/s vs full tok/s (ratio)'
    for _, bench in decode_benches(out):
        rows = [r for r in bench['rows'] if r['case'] in ('full', 'DAR')]
        rows += [{**r, 'context': f"{bench['budget_context']}, {bench['kv_budget_gib']:g} GiB of KV"}
                 for r in bench['budget_rows']]
        for r in rows:
            budget = 'GiB' in str(r['context'])
            what = f"decode tok/s, context {r['context']}" + ('' if budget else f", batch {r['batch']}")
            cells.setdefault((what, mode_label(r)), {})[r['case']] = r['decode_tok_s']
    modes = list(dict.fromkeys(mode for _, mode in cells))
    if cells:
        lines += ['| DAR vs full | ' + ' | '.join(modes) + ' |', '|---|' + '---|' * len(modes)]
        for what in dict.fromkeys(w for w, _ in cells):
            pair = lambda c: f"{c['DAR']:,.0f} vs {c['full']:,.0f} ({c['DAR'] / c['full']:.2f}x)" if len(c) > 1 else '-'
            lines.append(f"| {what} | " + ' | '.join(pair(cells.get((what, m), {})) for m in modes) + ' |')
    best = {}  # regime -> (step seconds, path) of its fastest training step
    for r in (steps or {}).get('training_steps', []):
        if 'error' not in r and r['regime'] in ('full', 'dar'):
            best[r['regime']] = min(best.get(r['regime'], (math.inf, '')), (r['step_s'], r['impl']))
    if len(best) == 2:
        (full, full_path), (dar, dar_path) = best['full'], best['dar']
        lines += ['', f"A training step (bf16, the pythia-70m shape at T=2048, batch 8), each at its fastest path: DAR "
                      f"{dar * 1e3:.1f} ms ({dar_path}), full {full * 1e3:.1f} ms ({full_path}): {dar / full:.2f}x."]
    return '\n'.join(lines) + '\n'


START, END = '<!-- gpu-check: written by `python gpu_check.py report OUT --readme` -->', '<!-- gpu-check end -->'


def write_readme_section(markdown, readme='README.md'):
    text = open(readme, encoding='utf-8').read()
    if START not in text or END not in text:
        raise SystemExit(f"{readme} has no GPU section markers ({START} ... {END}) to write between")
    head, rest = text.split(START, 1)
    with open(readme, 'w', encoding='utf-8') as f:
        f.write(head + START + '\n' + markdown + END + rest.split(END, 1)[1])


def main(argv):
    if len(argv) < 2 or argv[0] not in ('steps', 'report'):
        raise SystemExit(__doc__)
    out = argv[1]
    if argv[0] == 'steps':
        os.makedirs(out, exist_ok=True)
        return run_steps(out, dry='--dry' in argv)
    markdown = report(out) if os.path.isdir(out) else ''
    if not markdown.strip():  # nothing is written, so a README section is never blanked
        raise SystemExit(f"nothing to report in {out}: it holds no result of gpu_check.sh; run ./gpu_check.sh "
                         f"DATA_DIR {out} on the GPU machine first, then report the folder it filled")
    with open(os.path.join(out, 'summary.md'), 'w', encoding='utf-8') as f:
        f.write(markdown)
    if '--readme' in argv:
        write_readme_section(headline(out))
    print(markdown)


if __name__ == '__main__':
    main(sys.argv[1:])
