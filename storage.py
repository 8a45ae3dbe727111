"""
Files a run depends on, written so that an interruption (Ctrl-C, a crash, a power cut) never
leaves half of one behind, and read with a clear error when one is damaged anyway.
"""
import os

import torch


def flush_to_disk(f):
    """Data written to the open file f reaches the disk, not just the OS cache, before anything
    (a rename) publishes it."""
    f.flush()
    os.fsync(f.fileno())


def sync_dir(path):
    """Makes the renames inside directory path durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path, write, mode='wb'):
    """write(f) into path + '.tmp', flushed to disk, then renamed over path: a reader sees the
    old file or the new one, never part of one."""
    tmp = path + '.tmp'
    with open(tmp, mode, **({} if 'b' in mode else {'encoding': 'utf-8'})) as f:
        write(f)
        flush_to_disk(f)
    os.replace(tmp, path)
    sync_dir(os.path.dirname(os.path.abspath(path)))


CHECKPOINT_KEYS = ('model', 'optimizer', 'model_args', 'iter_num', 'best_val_loss', 'config')


def load_checkpoint(path):
    """The dict train.py saved at path, its tensors on the CPU (so that reading it can fail only for
    the file itself), or a clear error if the file is damaged or is not one."""
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # truncated zip, random bytes, empty file, ...: torch's own messages mislead
        # (they suggest weights_only=False, which would run arbitrary code and not repair the file)
        raise SystemExit(f"{path} is corrupt or not a checkpoint of train.py ({e.__class__.__name__} while "
                         "reading it); restore it from a copy, or train again into a fresh --out_dir") from None
    missing = [k for k in CHECKPOINT_KEYS if k not in checkpoint] if isinstance(checkpoint, dict) else CHECKPOINT_KEYS
    if missing:
        raise SystemExit(f"{path} is not a checkpoint of train.py (it lacks {', '.join(missing)}); "
                         "restore it from a copy, or train again into a fresh --out_dir")
    return checkpoint
