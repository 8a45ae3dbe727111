# Retrofit on a 2-core CPU: continue training a finished full-attention run of compare_cpu.py
# (tiny model, Shakespeare, context 512) as each regime, from the same weights, for 200 steps.
#   python compare.py config/compare_cpu.py --seeds=1337,1338      # the base: out-compare-cpu/full-seed1337
#   python compare.py config/retrofit_cpu.py --seeds=1337,1338
# Continued training on the plays; for the SFT set instead:
#   python plays_sft.py && python prepare.py --sft=data/plays_sft.jsonl --block_size=512 --out_dir=data/plays_sft
#   python compare.py config/retrofit_cpu.py --dataset=plays_sft --out_dir=out-retrofit-sft-cpu --seeds=1337,1338
out_dir = 'out-retrofit-cpu'
init_from = 'out-compare-cpu/full-seed1337/ckpt.pt'
dataset = 'shakespeare'
block_size = 512  # the base's context (an SFT dataset's examples are 513 tokens: the same)
dar_window = 64
# dar_rank: None = head_dim // 4 = 8
batch_size = 8
gradient_accumulation_steps = 1
max_iters = 200
eval_interval = 25
eval_iters = 8
log_interval = 25
learning_rate = 6e-4  # the base ended at 2e-4 after a peak of 2e-3
min_lr = 1e-4
warmup_iters = 10
