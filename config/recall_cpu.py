# Multi-query associative recall on a 2-core CPU: does DAR remember what a sliding window loses?
#   python prepare.py --synthetic=recall        # 32 tokens, 4 pairs, every query >= 8 after its key
#   python compare.py config/recall_cpu.py --seeds=1,2 --dar_ranks=32,16,8,4,2
# Every query's key lies >= 8 tokens back, beyond W = 4: local-only cannot answer, DAR only
# through its latents. What makes full attention bind keys to values here (README, "Recall"):
# batch 128 (at 32 it sat at the shortcut for 10k steps) and a short gap (at 64 tokens with
# gaps >= 24 it bound in some seeds only). Here it binds by step 500; about 45 s a run.
out_dir = 'out-recall'
dataset = 'recall'
n_layer = 2
n_head = 2  # head dim 32: r = d/4 = 8
n_embd = 64
dar_window = 4  # compare.py: the W of the dar and local runs; train.py alone: a DAR model
batch_size = 128
gradient_accumulation_steps = 1
max_iters = 1000
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 50
eval_interval = 250
eval_iters = 2
log_interval = 250
