# The four regimes at the Pythia-70m shape, with Pythia's optimisation settings, on GPUs:
#   python prepare.py --hub=HuggingFaceFW/fineweb-edu --hub_config=sample-10BT --tokenizer=gpt2
#   python compare.py config/pythia_70m.py --nproc=8
# Given to train.py directly it trains the DAR regime alone:
#   torchrun --standalone --nproc_per_node=8 train.py config/pythia_70m.py
# The budget is about 20 tokens per parameter (Chinchilla), 1.4B tokens, not Pythia's 300B.
from config.pythia_common import *  # noqa: F401,F403

out_dir = 'out-compare-pythia-70m'
preset = 'pythia-70m'
max_iters = 2700
learning_rate = 1e-3
min_lr = learning_rate / 10  # cosine to 0.1x
warmup_iters = max_iters // 100  # 1%
