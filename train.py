"""
Train a GPT with DAR attention, nanoGPT style. On one process:

    python train.py                                # tiny model on the embedded Shakespeare, CPU, minutes
    python train.py config/compare_cpu.py --dar_window=None --out_dir=out-full

With DDP on N processes (nccl on CUDA, gloo on CPU):

    torchrun --standalone --nproc_per_node=8 train.py config/pythia_160m.py

Every setting below can be changed by a config file or --key=value (see configurator.py).
A run can be continued exactly with --init_from=resume: the batch stream is a pure function
of (seed, iteration), so a resumed run sees the same batches as one never interrupted.

Retrofit: start from a trained full-attention model, switch its attention and keep training:

    python train.py --init_from=out-full/ckpt.pt --dar_window=64 --out_dir=out-retrofit
    python train.py --init_from=path/to/pythia-70m --dataset=sft_pythia --dar_window=256   # transformers GPT-NeoX

The model's shape comes from the base; dar_window, dar_rank, dar_maps, attn_impl and block_size
from the settings here. The latent maps start from the PCA of the base's own keys and values
(latent_init='calibrated') or random; the base's AdamW moments carry over where it has them.
"""
import atexit
import dataclasses
import json
import math
import os
import sys
import time
from contextlib import nullcontext, suppress

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from configurator import check_device, configure
from data import Dataset, check_vocabulary, vocabulary
import retrofit
from model import GPT, GPTConfig
from storage import load_checkpoint, write_atomically

# -----------------------------------------------------------------------------
# I/O
out_dir = 'out'
init_from = 'scratch'  # 'scratch', 'resume' (from out_dir/ckpt.pt), or a trained model: a ckpt.pt path,
# a transformers GPT-NeoX directory or Hub name (see the top of this file)
latent_init = 'calibrated'  # of a retrofit: 'calibrated' (PCA of the base's keys/values) or 'random'
calibration_batches = 8  # of a retrofit: training batches the PCA sees
overwrite = False  # True: a scratch run may replace the run already in out_dir (its checkpoint and log)
eval_interval = 100
eval_iters = 20
log_interval = 10
# data
dataset = 'shakespeare'  # a folder written by prepare.py: data/<dataset>, or an absolute path
batch_size = 8  # sequences per micro-batch, per process
block_size = None  # None: 256 on a token stream, the whole example on an examples dataset
gradient_accumulation_steps = 2  # micro-batches per iteration, summed over all processes
# model: a preset's shape; n_layer, n_head, n_embd replace the preset's when set
preset = 'tiny'
n_layer = None
n_head = None
n_embd = None
dar_window = None  # W: tokens this close keep full-dim keys/values; None: full attention
dar_rank = None  # r: dims of the distant tokens' latents; None: head_dim // 4; 0: drop them
dar_maps = 'free'  # 'free': learned down and up maps; 'tied': up = down^T (model.DARAttention.latent_maps)
attn_impl = 'auto'
rotary_pct = 0.25
parallel_residual = True
# AdamW, with linear warmup then cosine decay to min_lr
learning_rate = 1e-3
max_iters = 600
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # 0: no clipping
warmup_iters = 50
lr_decay_iters = None  # None: max_iters
min_lr = 1e-4
# system
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = ''  # '': bfloat16 autocast on CUDA (where supported), float32 on CPU
compile = False  # torch.compile; worth it on GPU, mostly compile time on CPU
seed = 1337
# -----------------------------------------------------------------------------
config = {k: v for k, v in globals().items()
          if not k.startswith('_') and isinstance(v, (int, float, bool, str, type(None)))}
configure(config, sys.argv[1:])
globals().update(config)
# -----------------------------------------------------------------------------
# defaults that depend on the device, resolved from the device asked for
cuda_bf16 = device.startswith('cuda') and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
dtype = config['dtype'] = dtype or ('bfloat16' if cuda_bf16 else 'float32')

for key in ('eval_interval', 'eval_iters', 'log_interval', 'batch_size', 'block_size', 'gradient_accumulation_steps'):
    if config[key] is not None and config[key] < 1:
        raise SystemExit(f"{key} must be at least 1, got {config[key]}")
if seed < 0:
    raise SystemExit(f"seed must be at least 0, got {seed}")
for key, low in (('learning_rate', 0.0), ('min_lr', 0.0), ('weight_decay', 0.0), ('grad_clip', 0.0),
                 ('warmup_iters', 0), ('max_iters', 0), ('lr_decay_iters', 0), ('calibration_batches', 1)):
    # a negative grad_clip would reverse the gradient, a negative lr climb the loss, an infinite one end in nan
    if config[key] is not None and not low <= config[key] < math.inf:
        raise SystemExit(f"{key} must be at least {low} and finite, got {config[key]}")
if min_lr > learning_rate:
    raise SystemExit(f"min_lr ({min_lr}) is above learning_rate ({learning_rate}): the schedule decays from "
                     "learning_rate down to min_lr; lower --min_lr or raise --learning_rate")
if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
    raise SystemExit(f"beta1 and beta2 must be in [0, 1), got {beta1} and {beta2}")
if latent_init not in ('calibrated', 'random'):
    raise SystemExit(f"latent_init must be 'calibrated' or 'random', got '{latent_init}'")
retrofit_from = None if init_from in ('scratch', 'resume') else init_from
# a Hub name is org/name: a value that can only be a path is named at once when missing, never looked up there
path_like = retrofit_from and (retrofit_from.endswith('.pt') or retrofit_from.startswith(('.', '/')) or
                               retrofit_from.count('/') > 1)
if path_like and not os.path.exists(retrofit_from):
    raise SystemExit(f"--init_from={init_from}: no such file or directory; give the path of a ckpt.pt or of a "
                     "GPT-NeoX model directory (a Hugging Face Hub name has the form org/name)")
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
if init_from == 'resume' and not os.path.exists(ckpt_path):
    raise SystemExit(f"--init_from=resume, but {ckpt_path} does not exist")
if init_from != 'resume' and os.path.exists(ckpt_path) and not overwrite:
    raise SystemExit(f"{ckpt_path} exists: continue that run with --init_from=resume, train into another "
                     "--out_dir, or replace it with --overwrite=True")
if retrofit_from is not None and os.path.abspath(retrofit_from) == os.path.abspath(ckpt_path):
    raise SystemExit(f"--init_from={init_from} is this run's own checkpoint; use --init_from=resume to continue it")
check_device(device, dtype)
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
if device_type == 'cpu' and dtype != 'float32':
    raise SystemExit("bfloat16 autocast is used on CUDA only; on CPU use --dtype=float32")
if device_type == 'cpu' and attn_impl == 'flex':
    raise SystemExit("--attn_impl=flex trains on CUDA only: PyTorch runs FlexAttention's backward on GPUs, not on the "
                     "CPU; train with --attn_impl=fused (the same attention, blockwise) or auto")
lr_decay_iters = max_iters if lr_decay_iters is None else lr_decay_iters
data = Dataset(os.path.join('data', dataset))
if block_size is None:
    block_size = config['block_size'] = data.default_block_size() or 256
for split in ('train', 'val'):
    data.check(split, block_size)

ddp = 'RANK' in os.environ  # set by torchrun
if ddp:
    dist.init_process_group(backend='nccl' if device_type == 'cuda' else 'gloo')
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if device_type == 'cuda':
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    if gradient_accumulation_steps % world_size:
        raise SystemExit(f"gradient_accumulation_steps ({gradient_accumulation_steps}) must be a multiple of "
                         f"the number of processes ({world_size})")
    gradient_accumulation_steps //= world_size
else:
    rank, world_size = 0, 1
master = rank == 0
tokens_per_iter = gradient_accumulation_steps * world_size * batch_size * block_size
if master:
    print(f"tokens per iteration: {tokens_per_iter:,} ({gradient_accumulation_steps * world_size} x "
          f"{batch_size} x {block_size})")
torch.manual_seed(seed)
if device_type == 'cuda':
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
autocast = nullcontext() if dtype == 'float32' else torch.autocast(device_type, dtype=torch.bfloat16)

# data -------------------------------------------------------------------------
# Batch positions come from a generator seeded by the batch's coordinates, never from a
# running RNG: so resuming at iteration i replays the uninterrupted stream, and the global
# batch of an iteration is the same for any number of processes.
TRAIN_STREAM, EVAL_STREAM, CALIBRATION_STREAM = 0, 1, 2


def get_batch(split, *coordinates):
    x, y = data.random_batch(split, block_size, batch_size, np.random.default_rng((seed, *coordinates)))
    if device_type == 'cuda':
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x, y

# model ------------------------------------------------------------------------
MODEL_KEYS = ('n_layer', 'n_head', 'n_embd', 'dar_window', 'dar_rank', 'dar_maps', 'attn_impl', 'rotary_pct', 'parallel_residual')
RETROFIT_KEYS = ('dar_window', 'dar_rank', 'dar_maps', 'attn_impl')  # what a retrofit may change, with block_size




def load_base(source):
    try:
        return retrofit.load_base(source)
    except ValueError as e:
        raise SystemExit(f"--init_from={source}: not a checkpoint file, and {e}") from None


def retrofit_config(base_args):
    """The base model's shape with this run's attention settings and context."""
    given = {k: config[k] for k in ('n_layer', 'n_head', 'n_embd') if config[k] is not None}
    if clashes := [f"{k}={v} (the base has {base_args[k]})" for k, v in given.items() if base_args[k] != v]:
        raise SystemExit(f"{', '.join(clashes)}: a retrofit keeps the base model's shape; leave these unset")
    if data.vocab_size > base_args['vocab_size']:
        raise SystemExit(f"dataset {dataset} has {data.vocab_size} token ids, the base model only "
                         f"{base_args['vocab_size']}; prepare the data with the model's own tokenizer "
                         "(prepare.py --tokenizer=hf:<model>)")
    return GPTConfig(**{**base_args, **{k: config[k] for k in RETROFIT_KEYS}, 'block_size': block_size})


checkpoint = base = None
try:
    if init_from == 'resume':
        checkpoint = load_checkpoint(ckpt_path)
        check_vocabulary(data.meta, data.dir, checkpoint.get('vocabulary'), ckpt_path)
        retrofit_from = checkpoint.get('retrofit_from')
    if retrofit_from is not None:
        base = load_base(retrofit_from) if checkpoint is None else None
        model_config = retrofit_config(checkpoint['model_args'] if checkpoint else base.model_args)
    else:
        overrides = {k: config[k] for k in MODEL_KEYS if config[k] is not None}
        # the vocabulary padded to a multiple of 64 (GPT-NeoX's 50,304 for gpt2's 50,257): fast matmul shapes
        model_config = GPTConfig.from_preset(preset, **overrides, block_size=block_size,
                                             vocab_size=-(-data.vocab_size // 64) * 64)
except ValueError as e:
    raise SystemExit(f"model settings: {e}")
model_args = dataclasses.asdict(model_config)
if checkpoint is not None:
    # attn_impl only picks among exact implementations of the same math, so it may change
    clashes = [f"{k}: checkpoint {v!r}, now {model_args.get(k)!r}" for k, v in checkpoint['model_args'].items()
               if k != 'attn_impl' and model_args.get(k) != v]
    if clashes:
        raise SystemExit(f"cannot resume {ckpt_path}: the settings give a different model ({'; '.join(clashes)}); "
                         "resume with the settings it was trained with")
model = GPT(model_config)
new_params = []
if checkpoint is not None:
    model.load_state_dict(checkpoint['model'])
elif base is not None:
    try:
        new_params = retrofit.load_base_weights(model, base.state_dict, retrofit_from)
    except ValueError as e:
        raise SystemExit(str(e)) from None
model.to(device)
if new_params and latent_init == 'calibrated':
    # the same batches on every process, so every replica starts from the same maps
    retrofit.calibrate_latents(model, (get_batch('train', CALIBRATION_STREAM, k)[0] for k in range(calibration_batches)))
if master and base is not None:
    print(f"retrofit of {retrofit_from} to {model_config.regime} attention; new: "
          f"{', '.join(sorted({n.rsplit('.', 1)[-1] for n in new_params})) or 'nothing'}"
          f"{f' ({latent_init} latent maps)' if new_params else ''}")
raw_model = model  # the plain module: checkpoints use it, not the compiled or DDP wrapper
if master:
    print(f"model: {model_config.regime} attention, {model.get_num_params():,} parameters "
          f"({model.get_num_params(non_embedding=False):,} with embeddings)")

optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
iter_num, best_val_loss = 0, float('inf')
saved_iter = None  # the iteration out_dir/ckpt.pt holds, when this run wrote or resumed it
if checkpoint is not None:
    optimizer.load_state_dict(checkpoint['optimizer'])
    iter_num, best_val_loss = checkpoint['iter_num'], checkpoint['best_val_loss']
    saved_iter = iter_num
    checkpoint = None  # free it
elif base is not None:
    retrofit.carry_optimizer_state(optimizer, model, base)
base = None  # free it
if compile:
    model = torch.compile(model)
eval_model = model  # compiled like training, but not the DDP wrapper, whose forward would wait for the other ranks
if ddp:
    model = DDP(model, device_ids=[torch.cuda.current_device()] if device_type == 'cuda' else None)

log_path = os.path.join(out_dir, 'log.jsonl')


def read_log():
    """The records of log.jsonl; a last line cut off by an interruption is dropped."""
    with open(log_path, encoding='utf-8') as f:
        lines = f.readlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines) and not line.endswith('\n'):
                print(f"{log_path}: dropped its last line, cut off by an interrupted write")
                break
            raise SystemExit(f"{log_path}, line {number}, is not a JSON record; delete or repair that line, "
                             "then resume") from None
    return records


# log of eval losses, for compare.py's curves; a resumed run drops what came after its checkpoint


def lock_out_dir():
    """One run at a time in out_dir: out_dir/.lock holds the pid of the run that writes there; a second
    run is refused while that process lives (a lock left by a dead one, or by this process, is taken)."""
    path = os.path.join(out_dir, '.lock')
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            try:
                with open(path, encoding='utf-8') as f:
                    pid = int(f.read().strip() or 0)
                if pid and pid != os.getpid():
                    os.kill(pid, 0)  # ProcessLookupError if no such process
                    raise PermissionError
            except PermissionError:  # alive (or another user's)
                raise SystemExit(f"{out_dir} is in use by another run (process {pid}); wait for it to end, "
                                 "or train into another --out_dir") from None
            except (ProcessLookupError, ValueError, OSError):
                pass
            with suppress(FileNotFoundError):
                os.remove(path)
    with os.fdopen(fd, 'w') as f:
        f.write(str(os.getpid()))
    return path


if master:  # the settings are valid: from here on the run may write
    try:
        os.makedirs(out_dir, exist_ok=True)
        lock_path = lock_out_dir()
        atexit.register(lambda: os.path.exists(lock_path) and os.remove(lock_path))
    except OSError as e:
        raise SystemExit(f"cannot write to {out_dir} ({e.strerror}); choose a writable --out_dir") from None
    records = []
    if init_from == 'resume' and os.path.exists(log_path):
        records = [r for r in read_log() if r['iter'] < iter_num]
    write_atomically(log_path, lambda f: f.writelines(json.dumps(r) + '\n' for r in records), mode='w')


@torch.no_grad()
def estimate_loss():
    """Mean loss on the same eval_iters batches of each split at every eval, so curves are comparable."""
    raw_model.eval()
    out = {}
    for code, split in enumerate(('train', 'val')):
        losses = []
        for k in range(eval_iters):
            X, Y = get_batch(split, EVAL_STREAM, code, k)
            with autocast:
                losses.append(eval_model(X, Y)[1])
        out[split] = torch.stack(losses).mean().item()  # one host sync per split, not one per batch
    raw_model.train()
    return out


def get_lr(it):
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= lr_decay_iters:
        return min_lr
    coeff = 0.5 * (1.0 + math.cos(math.pi * (it - warmup_iters) / (lr_decay_iters - warmup_iters)))
    return min_lr + coeff * (learning_rate - min_lr)


def stop_unless_finite(iteration, values):
    """Ends the run at a nan or inf loss or gradient norm, before it reaches a checkpoint."""
    bad = [f"{name} {value}" for name, value in values.items() if not math.isfinite(value)]
    if bad:
        kept = f" (iteration {saved_iter})" if saved_iter is not None else ""
        raise SystemExit(f"iteration {iteration}: {', '.join(bad)}; the run stopped without saving, so {ckpt_path} "
                         f"keeps the last good checkpoint{kept}. Lower --learning_rate or raise --warmup_iters, "
                         "then continue with --init_from=resume")


pending = []  # (iteration, loss, gradient norm) of the steps since the last check, still on the device


def check_steps():
    """Reads the pending steps' losses and norms in one host sync (the hot loop makes none), stops the run
    at the first non-finite one; returns how many steps there were and the last one's loss."""
    values = torch.stack([torch.stack([loss, norm]).float() for _, loss, norm in pending]).tolist() if pending else []
    for (iteration, _, _), (loss, norm) in zip(pending, values):
        stop_unless_finite(iteration, {'loss': loss, 'gradient norm': norm})
    n = len(pending)
    pending.clear()
    return n, values[-1][0] if values else math.nan


def save_checkpoint():
    global saved_iter
    checkpoint = {
        'model': raw_model.state_dict(),
        'optimizer': optimizer.state_dict(),
        'model_args': model_args,
        'iter_num': iter_num,
        'best_val_loss': best_val_loss,
        'config': config,
        'retrofit_from': retrofit_from,
        'vocabulary': vocabulary(data.meta),  # what the token ids mean: evaluate.py and resuming check it
    }
    # an interruption never leaves a truncated checkpoint behind
    write_atomically(ckpt_path, lambda f: torch.save(checkpoint, f))
    saved_iter = iter_num


# dense bf16 peak of the GPU for MFU: H100 and H200 989 TFLOPS, an A100 (and anything else) 312, as nanoGPT
PEAK_FLOPS = 989e12 if device_type == 'cuda' and any(n in torch.cuda.get_device_name() for n in ('H100', 'H200')) \
    else 312e12

# training loop ----------------------------------------------------------------
train_time, train_iters = 0.0, 0  # since the last eval, for its tokens/s
running_mfu = -1.0
t_mark = time.time()  # the last host sync: times are of the steps since, read when a check syncs
while True:
    if iter_num % eval_interval == 0 or iter_num == max_iters:  # every process: a bad step stops them all
        n, _ = check_steps()
        train_time, train_iters = train_time + time.time() - t_mark, train_iters + n
        if master:
            losses = estimate_loss()
            stop_unless_finite(iter_num, {'train loss': losses['train'], 'val loss': losses['val']})
            best_val_loss = min(best_val_loss, losses['val'])
            record = {'iter': iter_num, 'tokens': iter_num * tokens_per_iter,
                      'train_loss': losses['train'], 'val_loss': losses['val'], 'lr': get_lr(iter_num)}
            if train_iters:
                record['tokens_per_sec'] = train_iters * tokens_per_iter / train_time
            train_time, train_iters = 0.0, 0
            print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            with open(log_path, 'a', encoding='utf-8') as f:
                f.write(json.dumps(record, allow_nan=False) + '\n')
            # a resumed run's first eval is of its checkpoint; an untrained model is saved only over nothing
            if iter_num != saved_iter and (iter_num > 0 or not os.path.exists(ckpt_path)):
                save_checkpoint()
        t_mark = time.time()  # the eval is not training time
    if iter_num >= max_iters:
        break

    lr = get_lr(iter_num)
    for group in optimizer.param_groups:
        group['lr'] = lr
    train_loss = 0.0  # of this process, summed over its micro-batches
    for micro_step in range(gradient_accumulation_steps):
        if ddp:  # all-reduce the gradients once, after the last micro-batch
            model.require_backward_grad_sync = micro_step == gradient_accumulation_steps - 1
        X, Y = get_batch('train', TRAIN_STREAM, iter_num, rank * gradient_accumulation_steps + micro_step)
        with autocast:
            loss = model(X, Y)[1] / gradient_accumulation_steps
        loss.backward()
        train_loss += loss.detach()
    # the norm of the summed (all-reduced) gradient, the same on every process; max_norm inf only measures it
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or math.inf)
    optimizer.step()  # a non-finite step stops the run at the next check, before any checkpoint
    optimizer.zero_grad(set_to_none=True)
    pending.append((iter_num, train_loss, grad_norm))
    if iter_num % log_interval == 0:
        n, lossf = check_steps()
        dt = (time.time() - t_mark) / n
        train_time, train_iters, t_mark = train_time + dt * n, train_iters + n, time.time()
        mfu = raw_model.flops_per_token(block_size) * tokens_per_iter / world_size / dt / PEAK_FLOPS
        running_mfu = mfu if running_mfu < 0 else 0.9 * running_mfu + 0.1 * mfu
        if master:  # the loss of this process's micro-batches; time per step since the last log
            print(f"iter {iter_num}: loss {lossf:.4f}, lr {lr:.2e}, {dt * 1000:.0f}ms, "
                  f"{tokens_per_iter / dt:,.0f} tok/s, mfu {running_mfu * 100:.2f}%")
    iter_num += 1

if ddp:
    dist.barrier()  # let the master finish its final eval and checkpoint before tearing down
    dist.destroy_process_group()
if master:
    os.remove(lock_path)  # also here, not only at exit: a process may run train.py more than once
