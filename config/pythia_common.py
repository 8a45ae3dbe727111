# What the Pythia comparisons share (config/pythia_*.py import it): Pythia's optimisation
# settings at sequence length 2048, on FineWeb-Edu with the GPT-2 tokenizer, bf16 on GPUs.
dataset = 'fineweb-edu_gpt2'
block_size = 2048
dar_window = 256  # 1/8 of the context; the rank defaults to head_dim // 4 = 16
# 2**19 tokens per iteration (Pythia used 2**21): 8 sequences x 32 micro-batches, split over the GPUs
batch_size = 8
gradient_accumulation_steps = 32
weight_decay = 0.1
beta1, beta2 = 0.9, 0.95
grad_clip = 1.0
dtype = 'bfloat16'
compile = True
eval_interval = 250
eval_iters = 50
log_interval = 10
