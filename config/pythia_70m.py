# The four regimes at the Pythia-70m shape, with Pythia's optimisation settings, on GPUs:
#   python prepare.py --hub=HuggingFaceFW/fineweb-edu --hub_config=sample-10BT --tokenizer=gpt2
#   python compare.py config/pythia_70m.py --nproc=8
# Given to train.py directly it trains the DAR regime alone:
#   torchrun --standalone --nproc_per_node=8 train.py config/pythia_70m.py
# The budget is about 20 tokens per parameter (Chinchilla), 1.4B tokens, not Pythia's 300B.
out_dir = 'out-compare-pythia-70m'
dataset = 'fineweb-edu_gpt2'
preset = 'pythia-70m'
block_size = 2048
dar_window = 256  # 1/8 of the context; the rank defaults to head_dim // 4 = 16
# 2**19 tokens per iteration (Pythia used 2**21): 8 sequences x 32 micro-batches, split over the GPUs
batch_size = 8
gradient_accumulation_steps = 32
max_iters = 2700
learning_rate = 1e-3
min_lr = learning_rate / 10  # cosine to 0.1x
warmup_iters = max_iters // 100  # 1%
weight_decay = 0.1
beta1, beta2 = 0.9, 0.95
grad_clip = 1.0
dtype = 'bfloat16'
compile = True
eval_interval = 250
eval_iters = 50
log_interval = 10
