"""
Starting DAR from a trained full-attention model (the paper's SFT experiment, our reading): the
GPT-NeoX / Pythia import, loading a base model's weights, data-calibrated latent maps (the PCA
conversion of TransMLA-style retrofits) and the base's AdamW moments.

    model = from_pretrained('path/to/pythia-70m', dar_window=256)   # transformers GPT-NeoX weights
    calibrate_latents(model, batches)                               # A = top-r directions of the keys
    python train.py --init_from=path/to/pythia-70m --dar_window=256 # the same, then training
"""
import os
from collections import namedtuple

import torch

from model import GPT, GPTConfig, init_latent_maps
from storage import load_checkpoint

LATENT_MAPS = ('down_k', 'up_k', 'down_v', 'up_v')
# The trained model a retrofit starts from: its GPTConfig settings, weights and optimizer state (or None).
Base = namedtuple('Base', 'model_args state_dict optimizer')


def is_latent_map(name):
    return name.rsplit('.', 1)[-1] in LATENT_MAPS


def load_neox(name_or_dir):
    """(GPTConfig settings, our state_dict) of a transformers GPTNeoXForCausalLM."""
    try:
        from transformers import GPTNeoXForCausalLM  # needed only here
    except ImportError:
        raise ValueError("importing a Hugging Face model needs transformers: pip install -r requirements.txt") from None
    try:
        hf = GPTNeoXForCausalLM.from_pretrained(name_or_dir, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load a GPT-NeoX model from {name_or_dir!r}: {e}") from None
    c = hf.config
    unsupported = [f"{name} {value!r}" for name, value, ours in (
        ('hidden_act', c.hidden_act, 'gelu'), ('intermediate_size', c.intermediate_size, 4 * c.hidden_size),
        ('attention_bias', getattr(c, 'attention_bias', True), True)) if value != ours]
    if unsupported:
        raise ValueError(f"{name_or_dir}: {', '.join(unsupported)} is not the GPT-NeoX layout this model implements "
                         "(gelu, intermediate_size 4 x hidden_size, biases)")
    rope = getattr(c, 'rope_parameters', None) or {}  # transformers >= 5; earlier ones: rotary_pct, rotary_emb_base
    config = dict(
        n_layer=c.num_hidden_layers, n_head=c.num_attention_heads, n_embd=c.hidden_size, vocab_size=c.vocab_size,
        block_size=c.max_position_embeddings, layer_norm_eps=c.layer_norm_eps, parallel_residual=c.use_parallel_residual,
        rotary_pct=rope.get('partial_rotary_factor', getattr(c, 'rotary_pct', 0.25)),
        rotary_base=float(rope.get('rope_theta', getattr(c, 'rotary_emb_base', 10000.0))),
        tie_embeddings=bool(c.tie_word_embeddings), bias=True)
    H, d = c.num_attention_heads, c.hidden_size // c.num_attention_heads
    names = {'input_layernorm': 'ln_1', 'post_attention_layernorm': 'ln_2', 'attention.dense': 'attn.c_proj',
             'attention.query_key_value': 'attn.c_attn', 'mlp.dense_h_to_4h': 'mlp.c_fc', 'mlp.dense_4h_to_h': 'mlp.c_proj'}
    state = {}
    for name, t in hf.state_dict().items():
        if name == 'gpt_neox.embed_in.weight':
            state['transformer.wte.weight'] = t
        elif name.startswith('gpt_neox.final_layer_norm.'):
            state['transformer.ln_f.' + name.rsplit('.', 1)[1]] = t
        elif name in ('embed_out.weight', 'lm_head.weight'):  # the name before and since transformers 5
            state['lm_head.weight'] = t
        elif name.startswith('gpt_neox.layers.'):
            _, _, i, rest = name.split('.', 3)
            module, param = rest.rsplit('.', 1)
            if module not in names:
                continue  # buffers of older versions (rotary inv_freq, causal mask)
            if module == 'attention.query_key_value':
                # transformers splits per head: rows (H, 3, d), [q | k | v] within a head; ours (3, H, d)
                t = t.view(H, 3, d, *t.shape[1:]).transpose(0, 1).reshape(t.shape)
            state[f'transformer.h.{i}.{names[module]}.{param}'] = t
    return config, state


def load_base_weights(model, state_dict, source):
    """Loads a trained model's weights (state_dict, from `source`, named in errors) into model. Every
    tensor of model must come from it, with its shape, except the latent maps: those the base lacks,
    or has at another rank, keep their initialisation. Returns the names of the parameters that did
    not come from the base (to train from fresh optimizer state)."""
    own = model.state_dict()
    new, problems = [], []
    for name, tensor in own.items():
        theirs = state_dict.get(name)
        if is_latent_map(name) and (theirs is None or theirs.shape != tensor.shape):
            new.append(name)
        elif theirs is None:
            problems.append(f"{name} is missing")
        elif theirs.shape != tensor.shape:
            problems.append(f"{name} has shape {tuple(theirs.shape)}, this model's {tuple(tensor.shape)}")
    problems += [f"{n} has no place in this model" for n in state_dict if n not in own and not is_latent_map(n)]
    if problems:
        raise ValueError(f"the weights of {source} do not fit this model: {'; '.join(problems[:4])}"
                         f"{f' (and {len(problems) - 4} more)' if len(problems) > 4 else ''}; "
                         "the shape settings (n_layer, n_head, n_embd, vocab_size, bias, tie_embeddings) "
                         "must be the base model's")
    model.load_state_dict({n: t for n, t in state_dict.items() if n in own and n not in new}, strict=False)
    return new


def from_pretrained(name_or_dir, **overrides):
    """A transformers GPTNeoXForCausalLM (Pythia and its kin: a local directory, or a Hub name where
    the network allows) as our GPT. overrides change settings that need no new weights shape-wise:
    dar_window, dar_rank, dar_maps, attn_impl, block_size (default: max_position_embeddings). The
    latent maps of a DAR model start random: see calibrate_latents."""
    config, state_dict = load_neox(name_or_dir)
    model = GPT(GPTConfig(**{**config, **overrides}))
    load_base_weights(model, state_dict, name_or_dir)
    return model


@torch.no_grad()
def calibrate_latents(model, batches):
    """Each head's down maps become the top-r principal directions of its own keys (after rotary)
    and values on `batches` of token ids, as the full-attention model computes them; the up maps
    their transposes. A distant key then starts as its best rank-r reconstruction in the
    mean-square sense (uncentred: the latent map has no offset); at r = head_dim, exactly itself."""
    cfg = model.config
    if not cfg.has_latents:
        raise ValueError(f"a {cfg.regime} model has no latent maps to calibrate")
    H, d, r = cfg.n_head, cfg.head_dim, cfg.dar_rank
    moments = [torch.zeros(2, H, d, d, dtype=torch.float64) for _ in model.transformer.h]

    def accumulate(layer):
        def hook(attn, args):
            _, k, v = attn.qkv(*args[:3])
            for i, t in enumerate((k, v)):  # (B, H, T, d) -> (H, B*T, d) -> sum over B, T of t t^T per head
                t = t.double().transpose(0, 1).reshape(H, -1, d)
                moments[layer][i] += (t.transpose(-2, -1) @ t).cpu()
        return hook

    hooks = [block.attn.register_forward_pre_hook(accumulate(i)) for i, block in enumerate(model.transformer.h)]
    window, cfg.dar_window = cfg.dar_window, None  # the keys of the full-attention model
    try:
        for idx in batches:
            model.hidden_states(idx)
    finally:
        cfg.dar_window = window
        for h in hooks:
            h.remove()
    for block, (mk, mv) in zip(model.transformer.h, moments):
        attn = block.attn
        for moment, down, up in ((mk, attn.down_k, getattr(attn, 'up_k', None)),
                                 (mv, attn.down_v, getattr(attn, 'up_v', None))):
            # (H, d, r): the eigenvectors of the r largest eigenvalues
            init_latent_maps(down, up, torch.linalg.eigh(moment).eigenvectors.flip(-1)[..., :r])


def load_base(source):
    """The Base of a retrofit: a ckpt.pt of train.py, or a transformers GPT-NeoX model."""
    if os.path.isfile(source):
        ckpt = load_checkpoint(source)
        return Base(ckpt['model_args'], ckpt['model'], ckpt.get('optimizer'))
    return Base(*load_neox(source), optimizer=None)


def carry_optimizer_state(optimizer, model, base):
    """AdamW moments of the base's parameters into optimizer (of model); new latent maps start from none."""
    if base.optimizer is None:
        return
    with torch.device('meta'):
        base_names = sum(GPT(GPTConfig(**base.model_args)).param_groups(), [])
    by_name = {base_names[i]: state for i, state in base.optimizer['state'].items()}
    resumed = optimizer.state_dict()
    resumed['state'] = {i: by_name[n] for i, n in enumerate(sum(model.param_groups(), [])) if n in by_name}
    optimizer.load_state_dict(resumed)
