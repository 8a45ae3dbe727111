# The four regimes on source code (this Python's standard library) on a 2-core CPU: natural data
# in which distant tokens matter, and the loss on long-range tokens (evaluate.py) says whether they do.
#   python prepare.py --corpus=python
#   python compare.py config/code_cpu.py --seeds=1337,1338
# The plays' model and context (tiny preset, 512 tokens), batch 4, 600 steps (1.2M tokens), on a
# 2-core VM whose speed varied 5x; about 37 min for the 8 runs here; W = 32 from a short search
# (docs/experiments.md, "Source code"): no W tried made full attention use distant tokens at this budget.
out_dir = 'out-code-cpu'
dataset = 'python'
preset = 'tiny'  # 4 layers, 4 heads of 32 dims, n_embd 128
block_size = 512
dar_window = 32
# dar_rank: None = head_dim // 4 = 8
batch_size = 4
gradient_accumulation_steps = 1
max_iters = 600
eval_interval = 50
eval_iters = 4
log_interval = 25
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 20
