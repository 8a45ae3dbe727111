# The four regimes on a 2-core CPU: tiny model, embedded Shakespeare, context 8 windows long.
#   python prepare.py
#   python compare.py config/compare_cpu.py --seeds=1337,1338
# Measured there (2 seeds, 400 iterations): 0.47 (full) to 0.58 (dar) s per iteration, about 4 min
# per run with evals, 32 min for the 8 runs.
out_dir = 'out-compare-cpu'
dataset = 'shakespeare'
preset = 'tiny'  # 4 layers, 4 heads of 32 dims, n_embd 128
block_size = 512
dar_window = 64  # most of a query's keys lie beyond the window, so the regimes really differ
# dar_rank: None = head_dim // 4 = 8
batch_size = 8
gradient_accumulation_steps = 1
max_iters = 400  # about one pass over the 1.7M training tokens
eval_interval = 50
eval_iters = 8
log_interval = 25
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 25
