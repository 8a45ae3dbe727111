# The four regimes at the Pythia-160m shape, with Pythia's optimisation settings, on GPUs:
#   python prepare.py --hub=HuggingFaceFW/fineweb-edu --hub_config=sample-10BT --tokenizer=gpt2
#   python compare.py config/pythia_160m.py --nproc=8
# Given to train.py directly it trains the DAR regime alone:
#   torchrun --standalone --nproc_per_node=8 train.py config/pythia_160m.py
# The budget is about 20 tokens per parameter (Chinchilla), 3.2B tokens, not Pythia's 300B.
from config.pythia_common import *  # noqa: F401,F403

out_dir = 'out-compare-pythia-160m'
preset = 'pythia-160m'
max_iters = 6100
learning_rate = 6e-4
min_lr = learning_rate / 10  # cosine to 0.1x
warmup_iters = max_iters // 100  # 1%
