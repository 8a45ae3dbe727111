"""
Reading what prepare.py wrote, for train.py and evaluate.py. Two layouts, told apart by
meta.json's 'format':

    stream     <split>.bin: one long token stream; a training sequence is any window of it.
    examples   <split>.bin: N fixed-length examples back to back (meta 'example_length' = L),
               <split>.mask.bin: one uint8 per token, 1 where that token is a target the loss
               counts (e.g. the answers of the recall task, the response of an SFT pair).
               A training sequence is one whole example: inputs ex[:-1], targets ex[1:].

Either way a batch is (x, y) of int64, y = -1 where the loss does not count (cross_entropy's
ignore_index in model.py).
"""
import json
import os

import numpy as np
import torch

IGNORE = -1  # the target id the loss skips (model.GPT.forward's ignore_index)


def swap_dirs(data_dir):
    """The hidden siblings prepare.py uses to replace data_dir all at once: it writes the new
    dataset into the first, then renames data_dir to the second and the first to data_dir."""
    parent, name = os.path.split(os.path.abspath(data_dir))
    return os.path.join(parent, f'.{name}.new'), os.path.join(parent, f'.{name}.old')


def read_meta(data_dir):
    """data_dir/meta.json, checked for what every reader needs."""
    meta_path = os.path.join(data_dir, 'meta.json')
    try:
        with open(meta_path, encoding='utf-8') as f:
            meta = json.load(f)
        meta['dtype'], meta['vocab_size']
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"{meta_path} is damaged ({e.__class__.__name__}: {e}); run prepare.py again to rebuild "
                         f"{data_dir}") from None
    return meta


def vocabulary(meta):
    """What a dataset's token ids mean: its tokenizer and the number of ids. A checkpoint records it, so that a
    dataset prepared again with another one is never read as the data the model learned."""
    return {'tokenizer': meta.get('tokenizer'), 'vocab_size': meta['vocab_size']}


def describe_vocabulary(vocab):
    tokenizer = vocab['tokenizer']
    if not tokenizer:
        return f"{vocab['vocab_size']} ids without a tokenizer"
    name = tokenizer.get('encoding') or tokenizer.get('name') or tokenizer['kind']
    return f"the {name} tokenizer's {vocab['vocab_size']} ids"


def check_vocabulary(meta, data_dir, recorded, run):
    """SystemExit if the dataset in data_dir (with meta) has other token ids than the vocabulary `recorded` by
    the checkpoint `run`; recorded None (a checkpoint from before the record) is not checked."""
    if recorded is None or recorded == vocabulary(meta):
        return
    then, now = describe_vocabulary(recorded), describe_vocabulary(vocabulary(meta))
    differs = f"it holds {now}, the run learned {then}" if then != now else f"{now} stand for other tokens now"
    raise SystemExit(f"{data_dir} is not the data {run} was trained on: {differs}. It was prepared again since; "
                     "prepare it as it was, or give the dataset the run was trained on with --dataset")


class Dataset:
    """The prepared dataset in data_dir: its meta.json and memmaps of its splits."""

    def __init__(self, data_dir):
        self.dir = data_dir
        meta_path = os.path.join(data_dir, 'meta.json')
        if not os.path.exists(meta_path):
            new = swap_dirs(data_dir)[0]
            if not os.path.exists(data_dir) and os.path.exists(os.path.join(new, 'meta.json')):
                raise SystemExit(f"{data_dir} is missing: prepare.py was interrupted before moving the new dataset "
                                 f"into place, but it is complete in {new}; finish the move with "
                                 f"mv '{new}' '{data_dir}', or run prepare.py again")
            raise SystemExit(f"{meta_path} not found: prepare the dataset first (python prepare.py; see its --help)")
        self.meta = read_meta(data_dir)
        self.format = self.meta.get('format', 'stream')
        self.example_length = self.meta.get('example_length')
        # The files are opened once, now, and checked as opened: prepare.py replaces a dataset by renaming
        # a new directory into place, so a job keeps reading the data it started with however often
        # it is prepared again.
        self.files = {name: open(os.path.join(data_dir, name), 'rb') for name in sorted(os.listdir(data_dir))
                      if name.endswith('.bin')}
        self.check_sizes()

    @property
    def vocab_size(self):
        return self.meta['vocab_size']

    def default_block_size(self):
        """Examples fix the context (a whole example); a stream leaves it to the caller."""
        return None if self.format == 'stream' else self.example_length - 1

    def tokens(self, split):
        # a fresh memmap per batch: a long-lived one keeps every page read in memory (nanoGPT)
        return np.memmap(self.files[f'{split}.bin'], dtype=self.meta['dtype'], mode='r')

    def _mask(self, split):
        return np.memmap(self.files[f'{split}.mask.bin'], dtype=np.uint8, mode='r')

    def check_sizes(self):
        """Every split's files hold the tokens meta.json records: a cut-off file, or one left from
        another preparation, is an error here, not silent training on the wrong data."""
        itemsize = np.dtype(self.meta['dtype']).itemsize
        for split in ('train', 'val', 'test'):
            if self.format == 'stream':
                tokens = self.meta.get(f'{split}_tokens')
                files = {f'{split}.bin': itemsize}
            else:
                tokens = self.meta.get(f'{split}_examples')
                tokens = None if tokens is None else tokens * self.example_length
                files = {f'{split}.bin': itemsize, f'{split}.mask.bin': 1}  # the mask: a uint8 per token
            if tokens is None:  # a split this dataset does not have
                continue
            for name, bytes_per_token in files.items():
                path = os.path.join(self.dir, name)
                expected = tokens * bytes_per_token
                size = os.fstat(self.files[name].fileno()).st_size if name in self.files else None
                if size != expected:
                    found = 'is missing' if size is None else f'has {size:,} bytes'
                    raise SystemExit(f"{path} {found}, but meta.json records {tokens:,} tokens ({expected:,} bytes): "
                                     f"the dataset is incomplete or was changed after it was written; run prepare.py "
                                     f"again to rebuild {self.dir}")

    def num_sequences(self, split, block_size):
        """How many distinct sequences of block_size (+1 target) the split holds."""
        if self.format == 'stream':
            return len(self.tokens(split)) - block_size
        return len(self.tokens(split)) // self.example_length

    def check(self, split, block_size, fix=None):
        """A clear error when the split cannot give sequences of block_size; fix: what to do then, where that is
        not train.py's setting block_size."""
        if self.format == 'stream':
            if len(self.tokens(split)) <= block_size:
                raise SystemExit(f"{self.dir}/{split}.bin has {len(self.tokens(split))} tokens, too few for "
                                 f"block_size {block_size}; {fix or 'lower block_size or prepare more data'}")
        elif block_size > self.example_length - 1:
            raise SystemExit(f"block_size {block_size} is longer than this dataset's examples allow "
                             f"({self.example_length} tokens: block_size at most {self.example_length - 1}); "
                             f"{fix or 'leave block_size unset to use whole examples'}")
        elif self.num_sequences(split, block_size) == 0:
            raise SystemExit(f"{self.dir}/{split}.bin holds no example; prepare the dataset again")

    def sequences(self, split, starts, block_size):
        """(x, y) for the sequences starting at `starts` (token offsets of a stream, or example
        indices); an example longer than block_size + 1 is cut to its first block_size + 1 tokens."""
        data = self.tokens(split)
        if self.format == 'stream':
            rows = np.stack([data[i:i + block_size + 1] for i in starts]).astype(np.int64)
            x, y = rows[:, :-1], rows[:, 1:]
        else:
            L, mask = self.example_length, self._mask(split)
            rows = np.stack([data[i * L:i * L + block_size + 1] for i in starts]).astype(np.int64)
            keep = np.stack([mask[i * L + 1:i * L + block_size + 1] for i in starts]).astype(bool)
            x, y = rows[:, :-1], np.where(keep, rows[:, 1:], IGNORE)
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))

    def random_batch(self, split, block_size, batch_size, rng):
        """batch_size sequences drawn with numpy Generator rng."""
        return self.sequences(split, rng.integers(self.num_sequences(split, block_size), size=batch_size),
                              block_size)

    def fixed_batches(self, split, block_size, n_sequences, batch_size):
        """The same n_sequences (evenly spaced over the split, or all there are) for every model,
        in batches: what loss-by-position and recall accuracy are measured on."""
        total = self.num_sequences(split, block_size)
        if self.format == 'stream':
            starts = np.linspace(0, total - 1, min(n_sequences, total)).astype(np.int64)
        else:
            starts = np.arange(min(n_sequences, total))
        for i in range(0, len(starts), batch_size):
            yield self.sequences(split, starts[i:i + batch_size], block_size)
