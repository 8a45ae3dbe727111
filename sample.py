"""
Sample from a trained model with the DAR KV cache (prefill once, then one token per step).

    python sample.py --out_dir=out                          # from out/ckpt.pt (train.py)
    python sample.py --start="FILE:prompt.txt" --num_samples=3 --max_new_tokens=500
    python sample.py --init_from=pythia-70m --dar_window=256 --start="x" # random weights: speed only
    python sample.py --compile=True       # decode steps as one compiled graph (CUDA: replayed as a CUDA graph)
    python sample.py --compile=True --decode_attn=flex  # the latents read by FlexAttention's decoding kernel (CUDA)

Text is encoded and decoded with the tokenizer prepare.py recorded in the dataset's meta.json.
"""

import os
import sys
import time

import torch

from configurator import check_device, configure
from cpu_matvec import reuse_freed_memory, use_matvec
from data import check_vocabulary, read_meta
from model import GPT, GPTConfig
from prepare import load_tokenizer
from sampling import check_sampling, compile_step
from split_decode import use_decode_attn
from storage import load_checkpoint

init_from = 'resume'  # 'resume' (out_dir/ckpt.pt) or a preset name for random weights
out_dir = 'out'
dataset = ''  # data/<dataset>/meta.json gives the tokenizer; '' takes the checkpoint's dataset
start = '\n'  # the prompt, or FILE:path to read it from a file
num_samples = 2
max_new_tokens = 300
temperature = 0.8  # 0: greedy
top_k = 200  # 0: no top-k, else at least 1
top_p = 0.0  # 0: no nucleus sampling, else in (0, 1]
seed = 1337
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = ''  # '': bfloat16 on CUDA, float32 on CPU
dar_window = -1  # with a preset: -1 keeps full attention, else W
dar_rank = -1  # with a preset: -1 keeps head_dim // 4, else r
compile = False  # gpt-fast style: prefill, then the compiled decode step on a static cache (compiled in a warm-up run)
decode_attn = 'reference'  # the decode step's attention: 'reference' (model.py), 'flex' or 'reduce' (split_decode.py)

config = {k: v for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, str))}
configure(config, sys.argv[1:])
globals().update(config)
dtype = dtype or ('bfloat16' if device.startswith('cuda') else 'float32')  # from the device asked for
check_device(device, dtype)
top_k, top_p = top_k or None, top_p or None  # 0 turns them off here; sample_next takes None for that
try:
    check_sampling(temperature, top_k, top_p, max_new_tokens)
except ValueError as e:
    raise SystemExit(f"--{e}") from None
if num_samples < 1:
    raise SystemExit(f"--num_samples must be at least 1, got {num_samples}")

torch.manual_seed(seed)
if init_from == 'resume':
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')
    if not os.path.exists(ckpt_path):
        raise SystemExit(f"no checkpoint at {ckpt_path}; train one (python train.py --out_dir={out_dir}) "
                         "or sample from random weights with --init_from=<preset>")
    checkpoint = load_checkpoint(ckpt_path)
    if dar_window >= 0 or dar_rank >= 0:
        raise SystemExit("--dar_window and --dar_rank change a preset's random model; a checkpoint keeps the "
                         "attention it was trained with (retrofit it with train.py --init_from=... to change it)")
    model = GPT(GPTConfig(**checkpoint['model_args']))
    model.load_state_dict(checkpoint['model'])
    dataset = dataset or checkpoint['config'].get('dataset', '')
else:
    overrides = {}
    if dar_window >= 0:
        overrides['dar_window'] = dar_window
    if dar_rank >= 0:
        overrides['dar_rank'] = dar_rank
    try:
        model = GPT(GPTConfig.from_preset(init_from, **overrides))
    except ValueError as e:
        raise SystemExit(f"--init_from: {e}") from None
model.eval().to(device=device, dtype=getattr(torch, dtype))
try:
    use_decode_attn(model, decode_attn)
except ValueError as e:
    raise SystemExit(f"--{e}") from None
if device == 'cpu' and dtype == 'float32':
    use_matvec(model)  # faster CPU decode steps, the same math
    reuse_freed_memory()
print(f"{model.config.regime} attention, {model.get_num_params() / 1e6:.2f}M non-embedding parameters")

data_dir = dataset if os.path.isabs(dataset) else os.path.join('data', dataset)
meta_path = os.path.join(data_dir, 'meta.json')
meta = read_meta(data_dir) if dataset and os.path.exists(meta_path) else None
if meta is not None and init_from == 'resume':
    check_vocabulary(meta, data_dir, checkpoint.get('vocabulary'), ckpt_path)
# the dataset's own ids: the model's vocabulary is padded to a multiple of 64, and the padding is never sampled
n_tokens = model.config.vocab_size if meta is None else meta['vocab_size']
if n_tokens > model.config.vocab_size:
    raise SystemExit(f"{meta_path} has {n_tokens} token ids, the model only {model.config.vocab_size}: --dataset does "
                     "not match the checkpoint; name the dataset it was trained on")
if meta is not None and meta.get('tokenizer') is None:  # a synthetic task (recall): token ids in and out
    def encode(text):
        words = text.replace(',', ' ').split()
        if not words or not all(w.isdecimal() and int(w) < n_tokens for w in words):
            raise SystemExit(f"--start={text!r}: this dataset ({meta_path}) has no tokenizer (a synthetic task): give "
                             f"the prompt as token ids from 0 to {n_tokens - 1}, e.g. --start='3 17 5'")
        return [int(w) for w in words]
    decode = lambda ids: ' '.join(map(str, ids))
elif meta is not None:
    encode, decode = load_tokenizer(meta)
elif init_from == 'resume':
    raise SystemExit(f"{meta_path} not found: the checkpoint's tokenizer is recorded there; "
                     "run prepare.py for that dataset or name one with --dataset=")
else:  # random weights: any ids do, text is only for show
    encode, decode = (lambda s: [b % model.config.vocab_size for b in s.encode()]), (lambda ids: f"<{len(ids)} ids>")

if start.startswith('FILE:'):
    try:
        with open(start[5:], encoding='utf-8') as f:
            start = f.read()
    except (OSError, UnicodeDecodeError) as e:
        reason = 'not UTF-8 text' if isinstance(e, UnicodeDecodeError) else e.strerror
        raise SystemExit(f"--start=FILE:{start[5:]}: cannot read the prompt ({reason}); give a UTF-8 text file, "
                         "or the prompt itself as --start=...") from None
ids = encode(start)
if not ids:
    raise SystemExit("the prompt encodes to no tokens; give a non-empty --start")
x = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)

sync = torch.cuda.synchronize if device.startswith('cuda') else (lambda: None)
step = compile_step(model) if compile else None
generate = lambda: model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                  n_tokens=n_tokens, step=step)
if compile:  # compiles for this batch and length (and on CUDA records the graph): not timed
    t0 = time.perf_counter()
    generate()
    print(f"decode step compiled in {time.perf_counter() - t0:.1f} s")
sync()
t0 = time.perf_counter()
y = generate()
sync()
dt = time.perf_counter() - t0
for row in y.tolist():
    print(decode(row))
    print('---------------')
new_tokens = (y.shape[1] - x.shape[1]) * num_samples
kv = model.new_cache(num_samples, y.shape[1], device='meta').nbytes()
print(f"{new_tokens} tokens in {dt:.2f} s: {new_tokens / dt:.1f} tokens/s (prompt {len(ids)} tokens, "
      f"batch {num_samples}, prefill included{', compiled steps' * compile}); KV cache {kv / 2**20:.2f} MiB")
