# Multi-query associative recall on a 2-core CPU: does DAR remember what a sliding window loses?
#   python prepare.py --synthetic=recall        # 64 tokens, 8 pairs, every query >= 24 after its key
#   python compare.py config/recall_cpu.py --seeds=1,2 --dar_ranks=32,16,8,4,2
# Every query's key lies >= 24 tokens back, beyond W = 8: local-only cannot answer, DAR only
# through its latents. Batch 128 is what makes full attention bind keys to values here: at
# batch 32 it sat at the shortcut (guessing among the values not yet asked for) for 10k steps;
# at 128 it binds within about 1,000 steps (lr 1e-3; rotary on 25% of the head dims).
out_dir = 'out-recall'
dataset = 'recall'
n_layer = 2
n_head = 2  # head dim 32: r = d/4 = 8
n_embd = 64
dar_windows = '8'
batch_size = 128
gradient_accumulation_steps = 1
max_iters = 2000
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 50
eval_interval = 250
eval_iters = 2
log_interval = 250
