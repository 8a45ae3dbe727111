"""
Command-line configuration for train.py, compare.py and sample.py, nanoGPT style:

    python train.py config/compare_cpu.py --batch_size=32 --dar_window=None

Each argument is a config file (Python that assigns some of the script's settings) or
--key=value, applied in order, so later ones win. Values are Python literals; anything
that is not one is a string (--dataset=shakespeare). A value must have its default's type;
an int may stand for a float, and a None default means an optional integer. Config files
run in a namespace of their own: they can compute from what they assign themselves, not
from the defaults.
"""
import ast
import os
import traceback
import types


def configure(config, args, passthrough=False):
    """Update config (a dict of settings and their defaults) from args.

    A key config does not have is an error naming it, unless passthrough: then the
    unknown settings are returned as a dict (for a script that hands them on).
    """
    defaults = dict(config)  # types come from the defaults, not from what an earlier argument set
    unknown = {}
    for arg in args:
        if arg.startswith('--'):
            key, eq, raw = arg[2:].partition('=')
            if not eq:
                raise SystemExit(f"{arg}: settings are written --key=value")
            settings = {key: parse_value(raw, defaults.get(key))}
        else:
            if not os.path.isfile(arg):
                raise SystemExit(f"{arg}: no such config file (settings are written --key=value)")
            namespace = {}
            with open(arg, encoding='utf-8') as f:
                source = f.read()
            try:
                exec(compile(source, arg, 'exec'), namespace)
            except Exception as e:  # its line, not a traceback through this file
                line = e.lineno if isinstance(e, SyntaxError) else [
                    frame.lineno for frame in traceback.extract_tb(e.__traceback__) if frame.filename == arg][-1]
                raise SystemExit(f"{arg}, line {line}: {e.__class__.__name__}: {e}; fix the config file (Python that "
                                 "assigns settings; it cannot read the script's defaults)") from None
            settings = {k: v for k, v in namespace.items()
                        if not k.startswith('_') and not isinstance(v, types.ModuleType)}
        for key, value in settings.items():
            if key in config:
                config[key] = check_type(key, value, defaults[key], arg)
            elif passthrough:
                unknown[key] = value
            else:
                raise SystemExit(f"{arg}: unknown setting '{key}'; the settings are: {', '.join(config)}")
    return unknown


def parse_value(raw, default):
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw
    # a string setting keeps what was typed, even when it looks like a number (--dataset=2024)
    return raw if isinstance(default, str) and not isinstance(value, str) else value


def check_type(key, value, default, source):
    """value, if it fits the type of default; a None default stands for an optional integer."""
    if default is None:
        ok = value is None or (isinstance(value, int) and not isinstance(value, bool))
        expected = 'an integer or None'
    elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    else:
        ok = type(value) is type(default)
        expected = type(default).__name__
    if not ok:
        raise SystemExit(f"{source}: {key} must be {expected}, got {value!r}")
    return value


DTYPES = ('float32', 'bfloat16')


def check_device(device, dtype='float32'):
    """The device and dtype settings every script checks alike, before it creates or writes anything:
    device cpu, cuda or cuda:N (present on this machine), dtype one of DTYPES."""
    import torch  # here only: configure() itself needs no torch
    kind, colon, index = device.partition(':')
    if kind not in ('cpu', 'cuda') or (colon and (kind == 'cpu' or not index.isdigit())):
        raise SystemExit(f"device must be cpu, cuda or cuda:N, got '{device}'")
    if kind == 'cuda' and not torch.cuda.is_available():
        raise SystemExit(f"device '{device}' asked for, but no CUDA device is available; use --device=cpu")
    if index and int(index) >= torch.cuda.device_count():
        raise SystemExit(f"device '{device}': this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dtype not in DTYPES:
        raise SystemExit(f"dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
