# Retrofit where distant tokens are the whole task: a full-attention model that solved associative
# recall (compare.py config/recall_cpu.py, run full-seed1: 0.996 test accuracy) switched to each
# regime with every key beyond the window, then trained on for 300 steps.
#   python compare.py config/recall_cpu.py --seeds=1 --regimes=full                   # the base
#   python compare.py config/retrofit_recall_cpu.py --seeds=1,2 --dar_ranks=16,8,4
#   python compare.py config/retrofit_recall_cpu.py --seeds=1,2 --dar_ranks=16,8,4 --max_iters=0 \
#       --out_dir=out-retrofit-recall-step0-cpu                                          # accuracy at step 0
out_dir = 'out-retrofit-recall-cpu'
init_from = 'out-recall/full-seed1/ckpt.pt'
dataset = 'recall'
dar_window = 4  # every query's key is >= 8 back
batch_size = 128
gradient_accumulation_steps = 1
max_iters = 300
learning_rate = 3e-4  # the base ended at 1e-4 after a peak of 1e-3
min_lr = 1e-4
warmup_iters = 10
eval_interval = 25
eval_iters = 2
log_interval = 50
