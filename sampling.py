"""Sampling one token from logits, the check of its settings, and the compiled decode step
(model.GPT.generate, sample.py)."""
import torch


@torch.library.custom_op('dar::matmul', mutates_args=())
def opaque_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a @ b


opaque_matmul.register_fake(torch.matmul)


def cache_matmul(a, b):
    """a @ b, for a decode step's products with the cache. Compiling for a CPU, inductor would lower a product of one
    query row to a multiply-and-sum loop of its own, which reads a long cache slower than MKL (docs/benchmarks.md);
    as an op it cannot see into, the product stays MKL's. Eagerly and on GPUs: a @ b."""
    return opaque_matmul(a, b) if torch.compiler.is_compiling() and a.device.type == 'cpu' else a @ b


def check_sampling(temperature, top_k, top_p, max_new_tokens=0):
    """A ValueError naming the first generation setting out of range."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be at least 0, got {max_new_tokens}")
    if not temperature >= 0:  # a negative one would turn the distribution upside down
        raise ValueError(f"temperature must be at least 0 (0: greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, n_tokens=None):
    """One token per row from (B, V) logits, below n_tokens when given (the ids past it: vocabulary padding)."""
    check_sampling(temperature, top_k, top_p)
    logits = logits[:, :n_tokens]
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float('-inf'))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # the tokens before it already cover top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float('-inf')))
    return torch.multinomial(logits.softmax(-1), 1)[:, 0]


def compile_step(model):
    """The whole decode step of model on a static cache as one compiled graph, for GPT.generate(step=...):
    on CUDA replayed as a CUDA graph (one launch a step). It compiles at its first call for a batch size."""
    cuda = next(model.parameters()).device.type == 'cuda'
    return torch.compile(model, mode='reduce-overhead' if cuda else None, fullgraph=True, dynamic=False)
