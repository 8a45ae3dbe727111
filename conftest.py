"""Shared by the tests: running the scripts as a user would, fast."""
import contextlib
import io
import os
import runpy
import subprocess
import sys
import traceback

import pytest
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
# Scripts that run in this process (no interpreter start and torch import, ~3 s each). compare.py
# runs train.py in processes of its own, with its progress bar, and DDP needs torchrun.
IN_PROCESS = ('train.py', 'evaluate.py', 'sample.py', 'bench.py', 'compare.py')
if os.environ.get('PYTEST_XDIST_WORKER'):  # pytest -n 2: one thread per worker, as many as there are cores
    torch.set_num_threads(1)
# The longest tests (pytest --durations=10), run first: under -n, one started last would run alone at the end
LONGEST = ('test_gpu_check_dry_run', 'test_bench_runs_and_writes_results', 'test_compare_smoke',
           'test_bench_times_eager_and_compiled_decode_side_by_side', 'test_compare_retrofit',
           'test_compare_sweep_never_reuses_other_settings', 'test_gpu_check_runs_the_stages_asked_for',
           'test_ddp_matches_single_process')


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST)}
    items.sort(key=lambda item: rank.get(item.originalname, len(LONGEST)))  # stable: the rest keep their order


@pytest.hookimpl(optionalhook=True)  # an xdist hook: without xdist, nothing to schedule
def pytest_xdist_make_scheduler(config, log):
    """Under -n: a worker that runs out of tests takes pending ones from a busy worker's queue (xdist's default hands
    each worker a fixed block, so the long tests, all first, would queue on one worker)."""
    from xdist.scheduler import WorkStealingScheduling
    return WorkStealingScheduling(config, log)


def run_in_process(script, args, cwd):
    """script run as __main__ here, as `python script args` in cwd would run it: its exit code,
    stdout and stderr, an uncaught exception printed as a traceback on stderr."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    argv, old_cwd, threads = sys.argv, os.getcwd(), torch.get_num_threads()
    try:
        os.chdir(cwd)
        sys.argv = [script, *args]
        torch.set_num_threads(1)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(os.path.join(ROOT, script), run_name='__main__')
            except SystemExit as e:
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
                code = e.code if isinstance(e.code, int) else int(e.code is not None)
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        sys.argv = argv
        os.chdir(old_cwd)
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())


def run(script, *args, cwd=ROOT, nproc=1, check=True):
    """Runs a script with --key=value args; fails the test if it fails and check is set."""
    args = [str(a) for a in args]
    if nproc == 1 and script in IN_PROCESS:
        proc = run_in_process(script, args, cwd)
    else:
        launcher = [] if nproc == 1 else ['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}']
        # one thread per process: these models are too small to gain from more, and two threads per
        # process slow to a crawl when something else keeps the cores busy
        proc = subprocess.run([sys.executable, *launcher, os.path.join(ROOT, script), *args], cwd=cwd,
                              env={**os.environ, 'OMP_NUM_THREADS': '1'}, capture_output=True, text=True,
                              timeout=300)
    if check and proc.returncode:
        pytest.fail(f"{script} {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc
