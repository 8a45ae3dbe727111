"""
Benchmarks of DAR against full attention, measured side by side in one run: every figure is
the median of several timed runs after an untimed warm-up, fenced by device synchronisation.

    python bench.py --section=train    # a training step at each length, regime and path: time and peak memory
    python bench.py --section=decode   # KV cache: prefill and decode tokens/s, bytes, bandwidth
    python bench.py                    # both

Settings are the globals below, overridable as --key=value. Results: a printed table, and
<out_dir>/<section>_<device>.json (plus decode_<device>.png for the decode section); out_dir is
out-bench/ unless asked (--out_dir=results replaces the committed figures the docs cite).
"""

import functools
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from configurator import check_device, configure
from cpu_matvec import matvec_forms, reuse_freed_memory, use_matvec
from gpu_check import OpCounter, mib, show, targets_table, train_table
from model import ATTN_IMPLS, GPT, REGIMES, GPTConfig, regime_settings, resolve_attn_impl
from sampling import compile_step
from split_decode import DECODE_ATTNS, use_decode_attn

section = 'all'  # 'train', 'decode' or 'all'
preset = 'pythia-70m'
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = ''  # '': bfloat16 on CUDA, float32 on CPU
dar_window = 256
dar_rank = 16  # d / 4 at head dim 64
train_seq_lens = []  # []: 2048, 8192, 16384, 32768 on CUDA; 1024, 4096 on CPU, where the grid takes minutes
train_tokens = 0  # tokens a step: batch train_tokens // T (one sequence past it); 0: 16384 on CUDA, 4096 on CPU
train_regimes = 'full,dar,uniform,local'  # full at least: the ratios are against it
# attn_impl paths, side by side (comma-separated); 'auto': the one attn_impl='auto' picks at that T, measured once
# with its row marked. '': sdpa,fused,flex,auto on CUDA; sdpa,fused,auto on CPU (FlexAttention has no backward there)
train_paths = ''
train_repeats = 5
train_case_timeout = 1200.0  # seconds a case's process may run before the case is recorded as failed
decode_contexts = [1024, 4096, 16384, 32768]
decode_batches = [1, 8]  # one decode table per batch size
decode_steps = 32  # tokens per timed decode run
decode_repeats = 5
# How decode steps run, side by side (comma-separated): 'eager' (the default cache), 'compiled' (the whole step on a
# static cache through torch.compile, as sample.py --compile: CUDA graphs on CUDA), 'cudagraphs' (CUDA: the eager
# kernels captured). '': eager,compiled on CUDA; eager on CPU, where inductor takes about 30 s a shape
decode_modes = ''
decode_cases = 'full,DAR,uniform,local-only'  # full and DAR at least: the ratios are DAR against full
# The decode step's attention, side by side (comma-separated): 'reference' (model.decode_attention), 'flex' and
# 'reduce' (split_decode.py: the ring and the latents as two attentions merged by log-sum-exp; compiled, flex needs
# CUDA). Each row also gives its step's logit error against the eager reference form on a cache of random content
decode_attns = 'reference'
kv_budget_gib = 4.0  # the budget rows: the largest batch whose KV cache fits in this many GiB (0: no budget rows)...
budget_context = 0  # ... at this context, full vs DAR (0: the largest of decode_contexts)
prefill_repeats = 3
prefill_max_context = 0  # 0: 4096 on CPU (prefill is quadratic: minutes a run past it there), 32768 on CUDA
decode_processes = True  # each case and mode measured in a process of its own; False: all in this one (quick looks)
# each case and mode measured this many times in turn (full, DAR, ..., full, DAR, ...), a row's times the medians
# over them: a slow minute of a shared machine then falls on every case alike, not on one side of a ratio
decode_rounds = 1
reuse_freed = True  # CPU: cpu_matvec.reuse_freed_memory() (glibc keeps freed memory); False: as a plain loop runs
out_dir = 'out-bench'  # the committed figures in results/ are written only when asked: --out_dir=results
case = ''  # internal: one training case, 'regime:path', run in a child process so its peak memory is its own
seq_len = 0  # internal, with case
measure = 'time'  # internal, with case: 'time', 'memory' or both ('time,memory')
decode_group = ''  # internal: one decode case in one mode, 'case:mode', measured in a child process of its own
decode_matvec = ''  # internal, with decode_group: the weights' forms, 'shape:form,...' (-: F.linear; weight_forms)

config = {k: v for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, str, list))}
configure(config, sys.argv[1:])
globals().update(config)
# defaults that depend on the device, resolved from the device asked for
dtype = config['dtype'] = dtype or ('bfloat16' if device.startswith('cuda') else 'float32')
train_seq_lens = train_seq_lens or ([2048, 8192, 16384, 32768] if device.startswith('cuda') else [1024, 4096])
train_tokens = train_tokens or (16384 if device.startswith('cuda') else 4096)
train_paths = train_paths or ('sdpa,fused,flex,auto' if device.startswith('cuda') else 'sdpa,fused,auto')
prefill_max_context = prefill_max_context or (4096 if device == 'cpu' else 32768)
check_device(device, dtype)
budget_context = budget_context or max(decode_contexts)
for name, values in (('train_seq_lens', train_seq_lens), ('decode_contexts', decode_contexts),
                     ('decode_batches', decode_batches)):
    if not values or not all(isinstance(v, int) and v >= 1 for v in values):
        raise SystemExit(f"{name} must be a list of integers >= 1, got {values}")
for name, value in (('train_repeats', train_repeats), ('decode_steps', decode_steps),
                    ('budget_context', budget_context), ('decode_repeats', decode_repeats),
                    ('prefill_repeats', prefill_repeats), ('decode_rounds', decode_rounds)):
    if value < 1:
        raise SystemExit(f"{name} must be at least 1, got {value}")
decode_modes = config['decode_modes'] = decode_modes or ('eager,compiled' if device.startswith('cuda') else 'eager')
MODES = decode_modes.split(',')
if not set(MODES) <= {'eager', 'compiled', 'cudagraphs'} or 'cudagraphs' in MODES and device == 'cpu':
    raise SystemExit(f"decode_modes must be a comma-separated list of eager, compiled and (on CUDA) cudagraphs, "
                     f"got '{decode_modes}'")
uneven = [T for T in train_seq_lens if T < train_tokens and train_tokens % T]
if train_tokens < 1 or uneven:
    raise SystemExit(f"train_tokens must be 0 (the device's default) or a positive multiple of every train_seq_lens "
                     f"entry below it, so that every step holds as many tokens; got {train_tokens} with train_seq_lens "
                     f"{train_seq_lens}: change either")
if train_case_timeout <= 0:
    raise SystemExit(f"train_case_timeout must be a positive number of seconds, got {train_case_timeout}")
TRAIN_REGIMES = [r for r in REGIMES if r in train_regimes.split(',')]  # full first: the ratios read it
if 'full' not in TRAIN_REGIMES or not set(train_regimes.split(',')) <= set(REGIMES):
    raise SystemExit(f"train_regimes must be a comma-separated list of {', '.join(REGIMES)} with full among them "
                     f"(the ratios are against it), got '{train_regimes}'")
TRAIN_PATHS = list(dict.fromkeys(train_paths.split(',')))
if not set(TRAIN_PATHS) <= set(ATTN_IMPLS):
    raise SystemExit(f"train_paths must be a comma-separated list of {', '.join(ATTN_IMPLS)}, got '{train_paths}'")
if 'flex' in TRAIN_PATHS and not device.startswith('cuda'):
    raise SystemExit("train_paths: flex trains on CUDA only (FlexAttention has no backward on the CPU); "
                     "leave it out of --train_paths on the CPU")
ATTNS = decode_attns.split(',')
if not set(ATTNS) <= set(DECODE_ATTNS):
    raise SystemExit(f"decode_attns must be a comma-separated list of {', '.join(DECODE_ATTNS)}, got '{decode_attns}'")
if 'flex' in ATTNS and 'compiled' in MODES and device == 'cpu':
    raise SystemExit("decode_attns=flex with decode_modes=compiled needs CUDA: inductor's CPU FlexAttention returns "
                     "no log-sum-exp")
if section not in ('train', 'decode', 'all'):
    raise SystemExit(f"section must be 'train', 'decode' or 'all', got '{section}'")
try:
    GPTConfig.from_preset(preset, dar_window=dar_window, dar_rank=dar_rank)
except ValueError as e:
    raise SystemExit(f"model settings: {e}") from None

regime = functools.partial(regime_settings, window=dar_window, rank=dar_rank)  # -> (dar_window, dar_rank)
DECODE_CASES = {'full': regime('full'), 'DAR': regime('dar'), 'uniform': regime('uniform'),
                'local-only': regime('local')}
if not {'full', 'DAR'} <= set(decode_cases.split(',')) <= set(DECODE_CASES):
    raise SystemExit(f"decode_cases must list full and DAR, and may add uniform and local-only, got '{decode_cases}'")
DECODE_CASES = {name: DECODE_CASES[name] for name in decode_cases.split(',')}


def sync():
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def timed(fn, repeats, warmup=1):
    """Median seconds of fn() over repeats, after warmup untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def build(window, rank, impl='auto', block_size=None, weights_dtype=None):
    torch.manual_seed(0)
    overrides = dict(dar_window=window, dar_rank=rank, attn_impl=impl)
    if block_size:
        overrides['block_size'] = block_size
    model = GPT(GPTConfig.from_preset(preset, **overrides))
    return model.to(device=device, dtype=getattr(torch, weights_dtype or dtype))


def machine():
    if device.startswith('cuda'):
        return torch.cuda.get_device_name()
    return f"{os.cpu_count()}-core CPU ({torch.get_num_threads()} torch threads), torch {torch.__version__}"


def save(name, payload):
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}_{device}.json")
    with open(path + '.tmp', 'w') as f:  # then renamed: a run cut off mid-write leaves the last whole file
        json.dump(payload, f, indent=1)
    os.replace(path + '.tmp', path)
    return path


# ---------------------------------------------------------------------------------------------
# Training step


def _rss_reset():
    """Resets the kernel's peak-RSS mark (Linux); False where that is not possible."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


def _rss_kib(field):
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ':'))


def train_block(T):
    return max(T, GPTConfig.from_preset(preset).block_size)


def train_batch(T):
    return max(1, train_tokens // T)


def auto_path(name, T):
    """The path attn_impl='auto' takes for regime name at length T on this device."""
    window, rank = regime(name)
    config = GPTConfig.from_preset(preset, dar_window=window, dar_rank=rank, block_size=train_block(T))
    return resolve_attn_impl(config, T, torch.device(device))


def peak_step_bytes(step):
    """Bytes step() allocates above what was allocated before it; None where this machine's RSS marks show
    nothing (seen in the H200 machine's container)."""
    if device.startswith('cuda'):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        exact = _rss_reset()
        base = _rss_kib('VmRSS') * 1024
        step()
        peak = (_rss_kib('VmHWM') if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024 - base
    return peak if peak > 0 else None


def run_train_case():
    """Child process: one case at one length; prints what measure asks for, as JSON. Float32 weights under
    bfloat16 autocast when dtype is bfloat16, as train.py trains."""
    name, impl = case.split(':')
    model = build(*regime(name), impl, block_size=train_block(seq_len), weights_dtype='float32')
    idx = torch.randint(0, model.config.vocab_size, (train_batch(seq_len), seq_len + 1), device=device)
    x, y = idx[:, :-1], idx[:, 1:]
    autocast = torch.autocast(device.split(':')[0], torch.bfloat16, enabled=dtype == 'bfloat16')

    def step():
        model.zero_grad(set_to_none=True)  # gradients are part of the step's memory
        with autocast:
            _, loss = model(x, y)
        loss.backward()

    result = {}
    if 'time' in measure:
        result['seconds'], result['times'] = timed(step, train_repeats)
    if 'memory' in measure:
        step()  # warm-up outside the memory mark
        model.zero_grad(set_to_none=True)
        result['peak_bytes'] = peak_step_bytes(step)
    print(json.dumps(result))


def train_case(name, impl, T):
    """One case's row, measured in processes of its own (a peak is per process; an OOM or a crash ends only
    that process); a case that fails has its error's last line instead, and the run goes on."""
    row = dict(T=T, batch=train_batch(T), regime=name, path=impl, auto=impl == auto_path(name, T))
    # CUDA counts its peak exactly in the timing process; the CPU's RSS needs a process of its own, below
    for what in ['time,memory'] if device.startswith('cuda') else ['time', 'memory']:
        cmd = [sys.executable, __file__, f'--case={name}:{impl}', f'--seq_len={T}', f'--measure={what}'] + \
              [a for a in sys.argv[1:] if not a.startswith(('--section', '--case', '--seq_len', '--measure'))]
        env = dict(os.environ)
        if what == 'memory':
            # glibc keeps freed blocks under its (adaptive) mmap threshold for reuse, which would hide
            # a step's allocations from RSS; a fixed small threshold returns them to the OS. It also
            # slows allocation-heavy code, so time is measured in a process of its own without it.
            env['MALLOC_MMAP_THRESHOLD_'] = '65536'
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=train_case_timeout)
        except subprocess.TimeoutExpired:
            return {**row, 'error': f"timed out after {train_case_timeout:g} s ({what}; --train_case_timeout)"}
        if res.returncode:
            return {**row, 'error': (res.stderr.strip().splitlines() or [f"exit {res.returncode}"])[-1][:300]}
        row.update(json.loads(res.stdout.strip().splitlines()[-1]))
    return row


def with_ratios(rows):
    """rows, each against full attention's best at its T: its fastest path's time, its smallest peak."""
    for r in rows:
        full = [f for f in rows if f['T'] == r['T'] and f['regime'] == 'full' and 'error' not in f]
        best_s = min((f['seconds'] for f in full), default=None)
        best_peak = min((f['peak_bytes'] for f in full if f['peak_bytes']), default=None)
        r['time_vs_full'] = r['seconds'] / best_s if best_s and 'error' not in r else None
        r['memory_vs_full'] = r['peak_bytes'] / best_peak if best_peak and r.get('peak_bytes') else None
    return rows


def bench_train():
    auto = {T: {name: auto_path(name, T) for name in TRAIN_REGIMES} for T in train_seq_lens}
    for T in train_seq_lens:
        print(f"  T={T:5d}: attn_impl='auto' picks " + ', '.join(f"{p} for {n}" for n, p in auto[T].items()))
    cases = [(T, name, impl) for T in train_seq_lens for name in TRAIN_REGIMES
             for impl in dict.fromkeys(auto[T][name] if p == 'auto' else p for p in TRAIN_PATHS)]
    # the rows the targets read (auto's picks, at every T) first: a run cut off by a timeout still has them
    cases.sort(key=lambda c: c[2] != auto[c[0]][c[1]])
    payload = dict(machine=machine(), preset=preset, dtype=dtype, autocast=dtype == 'bfloat16', dar_window=dar_window,
                   dar_rank=dar_rank, tokens=train_tokens, repeats=train_repeats, auto=auto, rows=[])
    for T, name, impl in cases:
        r = train_case(name, impl, T)
        payload['rows'] = with_ratios(payload['rows'] + [r])
        path = save('train', payload)  # after every case: what a timeout cuts off is only the rest
        figures = r['error'] if 'error' in r else f"{r['seconds'] * 1e3:9.1f} ms  {mib(r['peak_bytes'])} MiB"
        print(f"  T={T:5d} B={r['batch']:<3d} {name:7s} {impl:5s} {figures}", flush=True)
    print(f"\nTraining step (forward + backward), {preset}, {train_tokens} tokens a step, W={dar_window}, "
          f"r={dar_rank}, {dtype}{' autocast' * payload['autocast']}, {machine()}; median of {train_repeats}")
    print('\n'.join(train_table(payload)))
    print('wrote', path)


# ---------------------------------------------------------------------------------------------
# Decoding with the KV cache


def read_bandwidth():
    """Bytes/s of a large reduction: the memory read rate this machine gives torch."""
    x = torch.ones(256 * 2**20, device=device, dtype=torch.float32)  # 1 GiB, past any cache
    median, _ = timed(lambda: x.sum(), 5)
    return x.numel() * x.element_size() / median


def kv_bytes(model, batch, ctx):
    """Bytes of model's KV cache for batch sequences of ctx tokens: what a decode step reads from it."""
    return model.new_cache(batch, ctx, device='meta').nbytes()


def weight_bytes(model):
    """Bytes a decode step reads from the weights: all but the token embedding (one row a step)."""
    wte = model.transformer.wte.weight
    return sum(p.numel() * p.element_size() for p in model.parameters()) - wte.numel() * wte.element_size()


def decode_case(model, batch, ctx, mode, attn, prefill):
    """Decode steps/s of model at context ctx in mode with decode attention attn, ops (CPU, eager) or kernels (CUDA)
    a step, device-busy ms a step (CUDA), the step's logit error (step_error), and, if prefill, the prompt's tok/s
    (batch 1, up to prefill_max_context, else None)."""
    cache = model.new_cache(batch, ctx + decode_steps + 1, static=mode != 'eager')
    prompt = torch.randint(0, model.config.vocab_size, (batch, ctx), device=device)

    def prefill_once():
        cache.reset()
        model.hidden_states(prompt, cache)

    prefill_tok_s = None
    if prefill and batch == 1 and ctx <= prefill_max_context:
        prefill_s, _ = timed(prefill_once, prefill_repeats)
        prefill_tok_s = ctx / prefill_s
    token = prompt[:, -1:]
    step = compiled(model, mode) if mode != 'eager' else model

    def decode():
        cache.reset(length=ctx)  # decode time does not depend on what the cache holds
        for _ in range(decode_steps):
            step(token, cache=cache)

    decode_s, _ = timed(decode, decode_repeats)
    error = step_error(model, step, token, cache, ctx, attn)
    cache.reset(length=ctx)
    ops, busy_ms = step_profile(lambda: step(token, cache=cache), mode, attn)
    return prefill_tok_s, decode_steps / decode_s, ops, busy_ms, error


def form_case(failed, label, model, batch, ctx, mode, attn, prefill):
    """decode_case in decode attention attn, or None where a split form fails (its first runs are on a GPU): noted
    in failed, so that the run still measures and writes the rest; a failing reference form stops the run."""
    try:
        return decode_case(use_decode_attn(model, attn), batch, ctx, mode, attn, prefill)
    except Exception as e:
        if attn == 'reference':
            raise
        failed.append(f"{label} {mode} {attn}: {type(e).__name__}: {e}"[:800])
        print('  FAILED', failed[-1], file=sys.stderr, flush=True)  # a child's stdout is its result
        return None


def step_error(model, step, token, cache, ctx, attn):
    """Largest logit difference / largest logit of one step against the eager step in the reference form, at ctx
    tokens of random keys, values and latents (a zeroed cache would hide a wrong read): the form and the kernels
    the compiler made for this device held to the reference on it."""
    for t in (*cache.k, *cache.v, *cache.a, *cache.b):
        t.normal_()
    cache.reset(length=ctx)
    got = step(token, cache=cache)[0].float()
    cache.reset(length=ctx)
    want = use_decode_attn(model, 'reference')(token, cache=cache)[0].float()
    use_decode_attn(model, attn)
    return ((got - want).abs().max() / want.abs().max()).item()


def step_profile(one_step, mode, attn):
    """(kernels, device-busy ms) of one step on CUDA, from the profiler; on the CPU (ops an eager step
    dispatches, None): a compiled step's kernels are inside its generated code, and FlexAttention is a
    higher-order op, which the op counter cannot enter."""
    if device.startswith('cuda'):
        activity = torch.profiler.ProfilerActivity.CUDA
        with torch.profiler.profile(activities=[activity]) as prof:
            one_step()
            sync()
        kernels = [e for e in prof.key_averages() if e.device_type.name == 'CUDA']
        return sum(e.count for e in kernels), sum(e.self_device_time_total for e in kernels) / 1e3
    if mode != 'eager' or attn == 'flex':
        return None, None
    with OpCounter() as counter:
        one_step()
    return counter.ops, None


@functools.cache
def compiled(model, mode):
    """The whole decode step, one graph per shape (a static cache takes its position as a tensor)."""
    if mode == 'cudagraphs':  # the eager kernels, captured: seconds to compile, not minutes
        return torch.compile(model, backend='cudagraphs', fullgraph=True, dynamic=False)
    return compile_step(model)


def budget_batch(model):
    """The largest batch whose KV cache at budget_context fits in kv_budget_gib."""
    batch = int(kv_budget_gib * 2**30 // kv_bytes(model, 1, budget_context + decode_steps + 1))
    if batch < 1:
        raise SystemExit(f"--kv_budget_gib={kv_budget_gib} holds no sequence of {budget_context} tokens")
    return batch


def weight_forms():
    """On a CPU, cpu_matvec's form for each weight shape of the decode cases (the same in every regime), timed once
    in the parent: every case then computes its weights alike, and a ratio of two cases compares their attention,
    not two timings of one weight (a close call between forms can fall either way in two processes)."""
    return matvec_forms(build(*DECODE_CASES['full'])) if device == 'cpu' else {}


def forms_arg(forms):  # weight_forms() as decode_matvec, and back
    return ','.join(f"{'x'.join(map(str, shape))}:{form or '-'}" for shape, form in forms.items())


def forms_from_arg(text):
    return {tuple(map(int, shape.split('x'))): None if form == '-' else form
            for shape, form in (item.split(':') for item in text.split(',') if item)}


@torch.no_grad()
def measure_group(name, mode, forms):
    """Every decode row of case name in mode, its weights in forms (weight_forms): each batch, context and form, then
    its budget row; its progress goes to stderr (a child process's stdout is its result)."""
    # one compilation per case, shape, mode, decode attention and round (one process may measure them all)
    torch._dynamo.config.recompile_limit = len(DECODE_CASES) * len(decode_contexts) * (len(decode_batches) + 1) * len(
        MODES) * len(ATTNS) * decode_rounds + 8
    model = build(*DECODE_CASES[name]).eval()
    if device == 'cpu':  # faster CPU decode steps, the same math; not in training, whose peak RSS it would hide
        if reuse_freed:
            reuse_freed_memory()
        use_matvec(model, forms)
    points = [(batch, ctx, False) for batch in decode_batches for ctx in decode_contexts]
    if kv_budget_gib and name in ('full', 'DAR'):
        points.append((budget_batch(model), budget_context, True))
    rows, failed = [], []
    for (batch, ctx, budget), attn in itertools.product(points, ATTNS):
        label = f"{'budget ' * budget}batch {batch}, context {ctx}, {name}"
        result = form_case(failed, label, model, batch, ctx, mode, attn,
                           prefill=(attn, mode) == (ATTNS[0], MODES[0]) and not budget)  # the prompt is timed once
        if result is None:
            continue
        prefill_tok_s, steps_per_s, ops, busy_ms, error = result
        rows.append(dict(batch=batch, context=ctx, case=name, mode=mode, attn=attn, budget=budget,
                         prefill_tok_s=prefill_tok_s, decode_tok_s=batch * steps_per_s, ms_per_step=1e3 / steps_per_s,
                         logit_error=error, ops_per_step=ops, device_busy_ms=busy_ms))
        print(f"  {label:38s} {mode:10s} {attn:9s} prefill {show(prefill_tok_s, '.0f'):>7} tok/s  decode "
              f"{rows[-1]['decode_tok_s']:8.1f} tok/s ({rows[-1]['ms_per_step']:.2f} ms/step)  error {error:.1e}",
              file=sys.stderr, flush=True)
    return dict(rows=rows, failed=failed)


def group_rows(name, mode, forms):
    """measure_group(name, mode, forms), in a process of its own unless decode_processes is off: a step's speed is
    its own there (in one process, an eager step measured after another case's compiled one ran 1.3x slower on a
    CPU)."""
    if not decode_processes:
        return measure_group(name, mode, forms)
    cmd = [sys.executable, __file__, f'--decode_group={name}:{mode}', f'--decode_matvec={forms_arg(forms)}'] + \
          [a for a in sys.argv[1:] if not a.startswith(('--section', '--decode_group', '--decode_matvec'))]
    res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # stderr, the progress, passes through
    if res.returncode:
        raise SystemExit(f"decode case {name} in mode {mode} failed (exit {res.returncode}): its error is above")
    return json.loads(res.stdout.strip().splitlines()[-1])


# Issue 22's decode targets at 32k context, each a lower bound on the best row of a run that matches (no row: not
# measured in that run): (what, at least, rows ('decode' or 'budget'), the rows' figure, the rows it reads).
# On CUDA the speed; on a CPU that the compiled step keeps eager's pace and DAR's eager step the bytes ceiling.
DECODE_TARGETS = {
    'cuda': [("DAR decode tok/s, batch 8", 15000, 'decode', 'decode_tok_s', dict(case='DAR', batch=8)),
             ("DAR over full's best, batch 8", 2.5, 'decode', 'decode_vs_full', dict(case='DAR', batch=8)),
             ("DAR decode tok/s, batch 1", 2000, 'decode', 'decode_tok_s', dict(case='DAR', batch=1)),
             ("DAR over full's best, batch 1", 1.8, 'decode', 'decode_vs_full', dict(case='DAR', batch=1)),
             ("DAR over full in the KV budget", 3.0, 'budget', 'decode_vs_full', dict(case='DAR')),
             ("prefill tok/s, batch 1, full", 500000, 'decode', 'prefill_tok_s', dict(case='full', batch=1)),
             ("prefill tok/s, batch 1, DAR", 500000, 'decode', 'prefill_tok_s', dict(case='DAR', batch=1))],
    'cpu': [(f"{case} compiled over eager, batch {batch}", 1.0, 'decode', 'vs_eager',
             dict(case=case, batch=batch, mode='compiled', attn='reference')) for case in ('full', 'DAR')
            for batch in (1, 8)] + [
            (f"DAR eager, of the bytes ceiling, batch {batch}", 0.95, 'decode', 'of_ceiling',
             dict(case='DAR', batch=batch, mode='eager', attn='reference')) for batch in (1, 8)]}


def decode_targets(rows, budget_rows):
    """[{target, at_least, measured, met}] of DECODE_TARGETS for this device in these rows (None: not measured)."""
    results = []
    for what, bound, kind, figure, match in DECODE_TARGETS['cuda' if device.startswith('cuda') else 'cpu']:
        values = [r[figure] for r in (rows if kind == 'decode' else budget_rows) if r['context'] == 32768
                  and r[figure] is not None and all(r[k] == v for k, v in match.items())]
        best = max(values, default=None)
        results.append(dict(target=what, at_least=bound, measured=best, met=None if best is None else best >= bound))
    return results


def median_rounds(rows):
    """One row per case, mode, form and point of the rows of every round: the first round's, its times the medians
    over the rounds (ms_per_step_rounds: each round's)."""
    rounds = {}
    for r in rows:
        rounds.setdefault(tuple(r[k] for k in ('batch', 'context', 'case', 'mode', 'attn', 'budget')), []).append(r)
    for same in rounds.values():
        row = dict(same[0], ms_per_step_rounds=[r['ms_per_step'] for r in same])
        row['ms_per_step'] = statistics.median(row['ms_per_step_rounds'])
        row['decode_tok_s'] = row['batch'] * 1e3 / row['ms_per_step']
        if row['prefill_tok_s'] is not None:
            row['prefill_tok_s'] = statistics.median(r['prefill_tok_s'] for r in same)
        yield row


def spread(values):
    return f" ({min(values):.2f}-{max(values):.2f})" if len(values) > 1 else ''


def bench_decode():
    bandwidth = read_bandwidth()
    forms = weight_forms()
    groups = [group_rows(name, mode, forms) for _ in range(decode_rounds) for name in DECODE_CASES for mode in MODES]
    matvec = {'x'.join(map(str, shape)): form for shape, form in forms.items() if form}
    failed = list(dict.fromkeys(f for g in groups for f in g['failed']))
    if device == 'cpu':
        print(f"matrix-vector products not F.linear's (cpu_matvec, timed faster here, for every case): "
              f"{matvec or 'none'}")
    order = lambda r: (r['budget'], r['batch'], r['context'], list(DECODE_CASES).index(r['case']),
                       ATTNS.index(r['attn']), MODES.index(r['mode']))
    measured = sorted(median_rounds(r for g in groups for r in g['rows']), key=order)
    with torch.device('meta'):  # shapes only: the bytes a step reads
        models = {name: GPT(GPTConfig.from_preset(preset, dar_window=w, dar_rank=r)).to(getattr(torch, dtype))
                  for name, (w, r) in DECODE_CASES.items()}
    for r in measured:
        model, steps_per_s = models[r['case']], r['decode_tok_s'] / r['batch']
        kv, full_kv, weights = (kv_bytes(model, r['batch'], r['context']), kv_bytes(models['full'], r['batch'],
                                r['context']), weight_bytes(model))
        r.update(kv_bytes=kv, weight_bytes=weights, achieved_bw=(weights + kv) * steps_per_s,
                 bw_fraction=(weights + kv) * steps_per_s / bandwidth,
                 # the best speedup over full attention at equal read bandwidth
                 bytes_ceiling=(weights + full_kv) / (weights + kv))
    rows, budget_rows = [r for r in measured if not r['budget']], [r for r in measured if r['budget']]
    same = lambda r, case, mode=None, attn=None: [f for f in rows if (f['batch'], f['context'], f['case']) == (
        r['batch'], r['context'], case) and mode in (None, f['mode']) and attn in (None, f['attn'])]
    for r in rows:  # against full attention at its best mode and form: an honest ratio
        full = max(same(r, 'full'), key=lambda f: f['decode_tok_s'])
        r['decode_vs_full'] = r['decode_tok_s'] / full['decode_tok_s']
        r['kv_vs_full'] = r['kv_bytes'] / full['kv_bytes']
        r['of_ceiling'] = r['decode_vs_full'] / r['bytes_ceiling']
        eager, reference = same(r, r['case'], 'eager', r['attn']), same(r, r['case'], r['mode'], 'reference')
        r['vs_eager'] = r['decode_tok_s'] / eager[0]['decode_tok_s'] if eager else None
        r['vs_reference'] = r['decode_tok_s'] / reference[0]['decode_tok_s'] if reference else None
    for r in budget_rows:
        r['decode_vs_full'] = r['decode_tok_s'] / max(f['decode_tok_s'] for f in budget_rows if f['case'] == 'full')

    print(f"\nDecode, {preset} (random weights), W={dar_window}, r={dar_rank}, {dtype}, {machine()}; read bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s; median of {decode_repeats} x {decode_steps} steps"
          f"{f' (then of {decode_rounds} rounds in turn, their range in parentheses)' * (decode_rounds > 1)}, "
          f"prefill (batch 1) median of "
          f"{prefill_repeats}, up to {prefill_max_context} tokens; x full: against full attention's best mode and "
          f"attention; x reference: against the reference attention in the same mode; ops: dispatched by an eager step "
          f"(CPU), kernels: launched (CUDA, profiler); error: a step's logits against the eager reference step's")
    for batch in decode_batches:
        print(f"\nBatch {batch} (decode tok/s counts the tokens of every sequence)\n"
              "| context | case | mode | attention | prefill tok/s | ms/step | decode tok/s | x full | x eager "
              "| x reference | bytes ceiling | of ceiling | ops or kernels | busy ms | KV MiB | bandwidth | error |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            if r['batch'] != batch:
                continue
            print(f"| {r['context']} | {r['case']} | {r['mode']} | {r['attn']} | {show(r['prefill_tok_s'], '.0f')} | "
                  f"{r['ms_per_step']:.2f}{spread(r['ms_per_step_rounds'])} | {r['decode_tok_s']:.1f} | "
                  f"{r['decode_vs_full']:.2f} | "
                  f"{show(r['vs_eager'], '.2f')} | {show(r['vs_reference'], '.2f')} | {r['bytes_ceiling']:.2f} | "
                  f"{r['of_ceiling']:.0%} | {show(r['ops_per_step'], 'd')} | {show(r['device_busy_ms'], '.3f')} | "
                  f"{r['kv_bytes'] / 2**20:.1f} | {r['achieved_bw'] / 1e9:.1f} GB/s ({r['bw_fraction']:.0%}) | "
                  f"{r['logit_error']:.1e} |")
    if budget_rows:
        print(f"\nThe largest batch whose KV cache fits in {kv_budget_gib} GiB, context {budget_context}\n"
              "| case | mode | attention | batch | KV MiB | decode tok/s | x full | bandwidth | error |\n"
              "|---|---|---|---|---|---|---|---|---|")
    for r in budget_rows:
        print(f"| {r['case']} | {r['mode']} | {r['attn']} | {r['batch']} | {r['kv_bytes'] / 2**20:.0f} | "
              f"{r['decode_tok_s']:.1f} | {r['decode_vs_full']:.2f} | {r['bw_fraction']:.0%} | "
              f"{r['logit_error']:.1e} |")
    targets = decode_targets(rows, budget_rows)
    print('', *targets_table(targets), sep='\n')
    for f in failed:
        print('\nFailed:', f)
    print('wrote', save('decode', dict(machine=machine(), preset=preset, dtype=dtype, dar_window=dar_window,
                                       dar_rank=dar_rank, read_bandwidth=bandwidth, decode_steps=decode_steps,
                                       decode_repeats=decode_repeats, decode_rounds=decode_rounds,
                                       decode_modes=MODES, decode_attns=ATTNS,
                                       reuse_freed=reuse_freed, matvec_forms=matvec,
                                       kv_budget_gib=kv_budget_gib,
                                       budget_context=budget_context, rows=rows, budget_rows=budget_rows,
                                       targets=targets, failed=failed)))
    plot_decode([r for r in rows if r['batch'] == decode_batches[0] and (r['attn'], r['mode']) == (ATTNS[0], MODES[0])],
                decode_batches[0])


def plot_decode(rows, batch):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name in DECODE_CASES:
        rs = [r for r in rows if r['case'] == name]
        ctx = [r['context'] for r in rs]
        ax1.plot(ctx, [r['kv_bytes'] / 2**20 for r in rs], marker='o', label=name)
        ax2.plot(ctx, [r['decode_tok_s'] for r in rs], marker='o', label=name)
    for ax, title in ((ax1, 'KV-cache MiB'), (ax2, 'decode tokens/s')):
        ax.set_xscale('log', base=2)
        ax.set_xlabel('context (tokens)')
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax1.set_yscale('log')
    ax2.legend()
    fig.suptitle(f"{preset}, batch {batch}, W={dar_window}, r={dar_rank}, {dtype}, {machine()}", fontsize=9)
    fig.tight_layout()
    path = os.path.join(out_dir, f"decode_{device}.png")
    fig.savefig(path, dpi=120)
    print('wrote', path)


if __name__ == '__main__':
    if case:
        run_train_case()
    elif decode_group:
        print(json.dumps(measure_group(*decode_group.split(':'), forms_from_arg(decode_matvec))))
    else:
        if section in ('train', 'all'):
            bench_train()
        if section in ('decode', 'all'):
            bench_decode()
