"""
The GPU check, in one command: on one CUDA GPU, within time_budget_s (8 minutes), does this repository
train the seed models correctly and fast enough? Everything goes to a markdown report (gpu_check.md).

$ python gpu_check.py                      # on the GPU
$ python gpu_check.py --dry_run=True       # on a CPU: tiny shapes, a few steps, in about a minute (checks this script)

Phases, most needed first, each a subprocess with a timeout: whatever time is left less half the nominal share
(weight x budget) of every phase still to come, so that a slow early phase (a cold compile) borrows from the later
ones without starving them. One that fails or runs out of time is recorded in the report and the others still run:
  data      the embedded Wikipedia sample (wiki_sample), or synthetic tokens where it cannot be prepared
  bench     bench.py at the seed shapes, compiled, bf16, micro-batch 50: learned and baseline, then the variants
            (tokens/s, MFU against this GPU's datasheet peak, learned/baseline, peak memory)
  train     train_steps steps of config/learned_shift0.py and config/baseline.py: the loss falls, and nothing
            recompiles after the first step (TORCH_LOGS=recompiles)
  sync      one training step as train.py takes it, under torch.profiler and CUDA's sync debug mode: no host sync
  torchrun  the training checks again through torchrun --nproc_per_node=1 (DDP)
  modes     torch.compile modes for a model this narrow (144 wide: kernel launches may dominate): default against
            eager, reduce-overhead (CUDA graphs) and max-autotune-no-cudagraphs
and the projected wall time of the full 26,000-step seed run. Goals: under 1 hour on one H100-class GPU, the
learned model's step at most 1.10x the baseline's. The dry run swaps inductor for dynamo's eager backend: dynamo
traces, guards and recompiles as on the GPU, without minutes of code generation on a CPU. On a GPU, most of the
time goes to cold compiles: a second run finds inductor's caches warm (/tmp/torchinductor_$USER) and does more.
"""

import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from configurator import ConfigError, configure
from runtime import RuntimeSetupError, atomic_write, cpu_kind, read_jsonl
from tokenizer import EOT

HERE = os.path.dirname(os.path.abspath(__file__))
# -----------------------------------------------------------------------------
dry_run = False  # True: CPU, tiny shapes, a few steps, dynamo's eager backend: checks this script in about a minute
out = 'gpu_check.md'  # the markdown report
time_budget_s = 480  # wall time of all phases together (the report is written within it)
data_dir = 'data'  # where wiki_sample is, or is prepared (as train.py would on first use)
data = 'wiki_sample'  # training data: 'wiki_sample' (synthetic tokens if it cannot be prepared) or 'synthetic'
variants = 'learned_precomputed,learned_fourier,learned_soft,learned_static,learned_random'  # config/ names benched too
train_steps = 200  # optimizer steps of each training check, at the seed's 50 x 16 sequences a step
torchrun_steps = 50  # optimizer steps of each check through torchrun --nproc_per_node=1
compile_modes = 'eager,reduce-overhead,max-autotune-no-cudagraphs'  # compared with torch.compile's default (learned model)
seed_run_steps = 26000  # optimizer steps of the full seed run, for its projected wall time
goal_hours = 1.0  # the projected seed run's goal on one H100-class GPU
goal_ratio = 1.10  # the learned/baseline step-time goal
work_dir = ''  # run folders and logs; '' = a temporary folder, removed at the end
# -----------------------------------------------------------------------------

# Dense (no sparsity) bf16 tensor-core peaks in FLOP/s, from NVIDIA's datasheets (nvidia.com/en-us/data-center/h100/,
# /h200/, /a100/; the H100 and H200 sheets give "with sparsity" figures, halved here): H100 SXM 989.4 TFLOPS, H100 PCIe
# 756, H100 NVL 835.5, H200 SXM 989.4 (GH200 too), H200 NVL 835.5, A100 312. Matched in this order against
# torch.cuda.get_device_name() ("NVIDIA H100 80GB HBM3" is the SXM part); runtime.PEAK_FLOPS counts every H100 as SXM.
PEAKS = [('H100 PCIe', 756e12), ('H100 NVL', 835.5e12), ('H200 NVL', 835.5e12), ('H100', 989.4e12),
         ('H200', 989.4e12), ('A100', 312e12)]
SEED_ACCUM = 16  # the seed run's micro-steps per optimizer step (train.py's default)
# dry run: train.py's model and loop shrunk to seconds on a CPU (the configs' other settings kept)
DRY_TRAIN = ['--n_layer=2', '--n_embd=32', '--n_head=2', '--block_size=32', '--batch_size=4',
             '--gradient_accumulation_steps=1', '--learning_rate=3e-3', '--warmup_iters=2']
DRY_STEPS = {'train': 16, 'torchrun': 10}
# what a host sync looks like in a profile: the CUDA runtime's blocking calls, and a tensor read by Python
SYNC_OPS = {'cudaStreamSynchronize', 'cudaDeviceSynchronize', 'cudaEventSynchronize', 'cudaMemcpy',
            'aten::item', 'aten::_local_scalar_dense'}
ALL_MODES = ('eager', 'default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs')
# set by main: the device, precision, this GPU's peak FLOP/s, the folder of run folders and logs; and the data phase's
# (data_dir, dataset) of the training checks
dev, dt, peak, work, train_data = 'cpu', 'float32', None, None, None
RULES = {'time_budget_s': 'x > 0', 'data': "x in ('wiki_sample', 'synthetic')", 'train_steps': 'x >= 2',
         'torchrun_steps': 'x >= 2', 'seed_run_steps': 'x >= 1', 'goal_hours': 'x > 0', 'goal_ratio': 'x > 0',
         'out': ('len(x) > 0', 'a file name'),
         'compile_modes': (f"set(x.split(',')) <= {set(ALL_MODES)!r}", f"a comma-separated list of {', '.join(ALL_MODES)}")}


def gpu_peak(name):
    return next((v for k, v in PEAKS if k in name), None)


def run(cmd, timeout, log, env=None):
    """(exit code, or 'timeout', and the output) of a command run in the repository. The output goes to a log file,
    not a pipe, which a grandchild could hold open; on timeout the whole process group ends (torchrun's workers,
    inductor's compile workers)."""
    with open(log, 'w+') as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        p = subprocess.Popen(cmd, cwd=HERE, env={**os.environ, **(env or {})}, stdout=f, stderr=subprocess.STDOUT,
                             start_new_session=True)
        try:
            rc = p.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            rc = 'timeout'
            for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, None)):  # train.py saves on SIGTERM: a moment
                try:
                    os.killpg(p.pid, sig)
                    p.wait(wait)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    pass
        f.seek(0)
        return rc, f.read()


def failed(rc, text):
    """Why a phase's command failed, in one line: its timeout, or its last line of output."""
    if rc == 'timeout':
        return 'ran out of its time'
    last = [line for line in text.splitlines() if line.strip()]
    return f"exit {rc}: {last[-1][:300] if last else 'no output'}"


# ----------------------------------------------------------------------------- data

def write_synthetic(path, n_train=500_000, n_val=50_000, seed=0):
    """Tokens from a random sparse Markov chain (1,024 of GPT-2's ids, each followed by one of 4), in
    prepare_wiki.py's format: learnable, so that the loss falls as it does on text."""
    rng = np.random.default_rng(seed)
    ids, succ = rng.choice(EOT, 1024, replace=False), rng.integers(0, 1024, (1024, 4))
    states, choice, s = np.empty(n_train + n_val, dtype=np.int64), rng.integers(0, 4, n_train + n_val), 0
    for i in range(len(states)):
        s = states[i] = succ[s, choice[i]]
    tokens = ids[states].astype(np.uint16)
    os.makedirs(path, exist_ok=True)
    tokens[:n_train].tofile(os.path.join(path, 'train.bin'))
    tokens[n_train:].tofile(os.path.join(path, 'val.bin'))
    meta = {'vocab_size': EOT + 1, 'eot_token': EOT, 'dtype': 'uint16', 'train_tokens': n_train, 'val_tokens': n_val,
            'source': 'synthetic', 'source_detail': 'gpu_check.py: a random sparse Markov chain over 1,024 GPT-2 ids'}
    with open(os.path.join(path, 'meta.json'), 'w') as f:
        json.dump(meta, f, indent=1)


def data_phase(timeout):
    """The training checks' data: wiki_sample as train.py would find or prepare it, else synthetic tokens."""
    global train_data
    why, folder = "data='synthetic'", os.path.abspath(data_dir)  # the commands run in the repository
    if data == 'wiki_sample':
        if os.path.exists(os.path.join(folder, 'wiki_sample', 'meta.json')):
            train_data = (folder, 'wiki_sample')
            return {'ok': True, 'detail': f"wiki_sample, already prepared in {data_dir}"}
        rc, text = run([sys.executable, 'prepare_wiki.py', '--source=sample', f'--data_dir={folder}'], timeout,
                       os.path.join(work, 'prepare_wiki.log'))
        if rc == 0:
            train_data = (folder, 'wiki_sample')
            return {'ok': True, 'detail': f"wiki_sample, prepared in {data_dir}"}
        why = f"wiki_sample could not be prepared ({failed(rc, text)})"
    write_synthetic(os.path.join(work, 'data', 'synthetic'))
    train_data = (os.path.join(work, 'data'), 'synthetic')
    return {'ok': True, 'detail': f"synthetic Markov-chain tokens: {why}"}


# ----------------------------------------------------------------------------- bench.py

def bench_phase(models, timeout):
    """bench.py's training step of these models, alternated round by round; its table's rows parsed."""
    shape = (['--shapes=small', '--modes=eager', '--batch_size=2', '--steps=1', '--rounds=1', '--memory=False']
             if dry_run else ['--shapes=seed', '--modes=compiled', '--batch_size=50', '--steps=5', '--rounds=3'])
    cmd = [sys.executable, 'bench.py', f'--models={models}', '--generate=False', f'--device={dev}', f'--dtype={dt}', *shape]
    rc, text = run(cmd, timeout, os.path.join(work, f"bench_{models.replace(',', '_')[:60]}.log"))
    rows, projected = parse_bench(text)
    ok = rc == 0 and set(models.split(',')) <= set(rows)
    return {'ok': ok, 'error': None if ok else failed(rc, text), 'rows': rows, 'cmd': ' '.join(cmd[1:]),
            'bench_hours': projected, 'log': text}


def parse_bench(text):
    """bench.py's table rows {model: figures}, with MFU against this GPU's peak and the ratio to the baseline, and
    its projected seed-run hours (None where it printed none)."""
    rows = {}
    for line in text.splitlines():  # mode dtype model params active ms/step tok/s peak-MiB GFLOP/tok MFU warm-up-s
        f = line.split()
        if len(f) == 11 and f[0] in ('eager', 'compiled'):
            rows[f[2]] = dict(ms=float(f[5]), tok_s=float(f[6].replace(',', '')), gflop_tok=float(f[8]),
                              mem_mib=None if f[7] == '-' else float(f[7]), warmup_s=float(f[10]))
    for r in rows.values():
        r['mfu'] = r['gflop_tok'] * 1e9 * r['tok_s'] / peak if peak else None
        r['ratio'] = r['ms'] / rows['baseline']['ms'] if 'baseline' in rows else None
    projected = re.search(r'projected full seed run .*: ([\d.]+) h', text)
    return rows, float(projected[1]) if projected else None


# ----------------------------------------------------------------------------- train.py, alone and through torchrun

def train_phase(name, config_file, launcher, timeout):
    """train.py on config_file for a few hundred steps with TORCH_LOGS=recompiles: does the loss fall, does anything
    recompile after the first step (train.py's iter-0 line), and how long does a step take."""
    if train_data is None:
        raise RuntimeError("no training data: the data phase failed")
    if launcher == 'torchrun' and not torch.distributed.is_available():
        return {'ok': False, 'error': 'torch.distributed is not available in this build of torch'}
    steps = DRY_STEPS[launcher] if dry_run else {'train': train_steps, 'torchrun': torchrun_steps}[launcher]
    run_dir = os.path.join(work, f'{launcher}_{name}')
    args = [config_file, f'--dataset={train_data[1]}', f'--data_dir={train_data[0]}', f'--out_dir={run_dir}',
            f'--max_iters={steps}', f'--eval_interval={steps}', '--compile=True', f'--device={dev}', f'--dtype={dt}']
    args += (DRY_TRAIN + ['--eval_iters=2', '--log_interval=2'] if dry_run else
             ['--eval_iters=20', '--log_interval=10', f'--warmup_iters={steps // 2}'])  # the seed's 300 > steps
    script = train_script()
    if launcher == 'torchrun':
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=1', script, *args]
    else:
        cmd = [sys.executable, script, *args]
    rc, text = run(cmd, timeout, os.path.join(work, f'{launcher}_{name}.log'), {'TORCH_LOGS': 'recompiles'})
    metrics = os.path.join(run_dir, 'metrics.jsonl')
    records = read_jsonl(metrics) if os.path.exists(metrics) else []  # partial on a timeout, still worth reading
    losses = [r['loss'] for r in records if 'loss' in r]
    vals = [(r['iter'], r['val/loss']) for r in records if 'val/loss' in r]
    times = [r['ms_per_iter'] / 1000 for r in records if 'ms_per_iter' in r]
    first_step = text.find('\niter 0/')  # printed once the first step (compilation, the eval-to-train recompile) is done
    r = {'ok': rc == 0, 'error': None if rc == 0 else failed(rc, text), 'cmd': ' '.join(cmd[1:]), 'log': text,
         'steps': steps, 'done': records[-1]['iter'] if records else None,
         'recompiles': text.count('Recompiling function'),
         'recompiles_after': text[first_step:].count('Recompiling function') if first_step >= 0 else None,
         'loss': (losses[0], losses[-1]) if len(losses) >= 2 else None,
         'val': (vals[0], vals[-1]) if len(vals) >= 2 else None,
         'step_s': statistics.median(times) if times else None}
    # the loss falls: the final val loss (eval mode, the same batches each time) 1% below step 0's; the last logged
    # training loss 1% below the first where the run ended before its final evaluation
    first, last = (r['val'][0][1], r['val'][1][1]) if r['val'] else r['loss'] or (None, None)
    r['falls'] = None if first is None else last < 0.99 * first
    r['falls_on'] = None if first is None else f"{'val' if r['val'] else 'train'} {first:.3f} -> {last:.3f}"
    r['tok_s'] = statistics.median(rec['tokens_per_s'] for rec in records if 'tokens_per_s' in rec) if times else None
    return r


def train_script():
    """train.py itself; in a dry run a wrapper that runs it with torch.compile on dynamo's eager backend."""
    if not dry_run:
        return 'train.py'
    path = os.path.join(work, 'train_dynamo_eager.py')
    with open(path, 'w') as f:
        f.write(f"import functools, runpy, sys\nimport torch\nsys.path.insert(0, {HERE!r})\n"
                f"torch.compile = functools.partial(torch.compile, backend='eager')\n"
                f"sys.argv[0] = {os.path.join(HERE, 'train.py')!r}\n"
                f"runpy.run_path(sys.argv[0], run_name='__main__')\n")
    return path


# ----------------------------------------------------------------------------- one step, profiled or in other compile modes

def probe(model, mode, device, dtype, shape, batch_size, accum, steps, profile):
    """One optimizer step as train.py's loop takes it (micro-batches from host memory, pinned and copied without
    blocking; forward with statistics, backward, AdamW, the nan/inf flag), compiled in `mode` ('eager': not at all,
    'dynamo': dynamo's eager backend): first-step (compile) time, step time, peak memory; with profile, one more step
    under torch.profiler and CUDA's sync debug mode, listing its host syncs. Run in a subprocess: prints PROBE {json}."""
    import collections
    import warnings

    from torch.profiler import ProfilerActivity, record_function

    import bench
    from runtime import autocast, setup_device
    dev_type = device.split(':')[0]
    setup_device(dev_type)
    model_type, args = bench.model_spec(model, shape)
    m, opt = bench.build(model_type, args, device)
    cm = m if mode == 'eager' else torch.compile(m, backend='eager') if mode == 'dynamo' else torch.compile(
        m, mode=None if mode == 'default' else mode)
    ctx, cuda = autocast(dtype, dev_type), dev_type == 'cuda'
    T, V = args['block_size'], args['vocab_size']
    tokens = np.random.default_rng(0).integers(0, V, 1_000_000).astype(np.uint16)
    window, gen = np.arange(T + 1), torch.Generator().manual_seed(0)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step(it, bad_iter):
        loss_sum = torch.zeros((), device=device)
        for _ in range(accum):
            ix = torch.randint(len(tokens) - T, (batch_size,), generator=gen).numpy()
            w = torch.from_numpy(tokens[ix[:, None] + window].astype(np.int64))
            x, y = (t.pin_memory().to(device, non_blocking=True) if cuda else t for t in (w[:, :-1], w[:, 1:]))
            if mode == 'reduce-overhead':
                torch.compiler.cudagraph_mark_step_begin()  # the previous micro-step's graph outputs are done with
            with ctx:
                loss = cm(x, y, return_stats=True)[1] / accum
            loss.backward()
            loss_sum += loss.detach()
        with record_function('optimizer.step'):
            opt.step()
        opt.zero_grad(set_to_none=True)
        return torch.where((bad_iter < 0) & ~torch.isfinite(loss_sum), it, bad_iter)

    bad = torch.tensor(-1, device=device)
    t0 = time.time()
    bad = step(0, bad)
    sync()
    first_s = time.time() - t0
    for it in (1, 2):  # warm-up: CUDA graphs are recorded on the following calls
        bad = step(it, bad)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    for it in range(3, 3 + steps):
        bad = step(it, bad)
    sync()
    step_s = (time.time() - t0) / steps
    res = {'model': model, 'mode': mode, 'first_step_s': first_s, 'micro_step_s': step_s / accum,
           'tok_s': batch_size * T * accum / step_s, 'flops_tok': m.flops_per_token(),
           'mem_mib': torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else None}
    if profile:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            with torch.profiler.profile(activities=activities) as prof:
                if cuda:
                    torch.cuda.set_sync_debug_mode('warn')
                with record_function('gpu_check_step'):
                    bad = step(3 + steps, bad)
                if cuda:
                    torch.cuda.set_sync_debug_mode(0)
            sync()
        events = prof.events()
        span = next(e.time_range for e in events if e.name == 'gpu_check_step' and e.device_type.name == 'CPU')
        within = (lambda e, s: s.start <= e.time_range.start and e.time_range.end <= s.end)
        inside = [e for e in events if within(e, span)]
        if not cuda:  # CPU AdamW reads its step counts with .item(), from host memory: no sync (CUDA's fused AdamW reads none)
            opt_spans = [e.time_range for e in inside if e.name == 'optimizer.step']
            inside = [e for e in inside if not any(within(e, s) for s in opt_spans)]
        res['syncs'] = dict(collections.Counter(e.name for e in inside if e.name in SYNC_OPS))
        res['sync_warnings'] = sorted({str(w.message).splitlines()[0][:200] for w in caught
                                       if 'synchroniz' in str(w.message).lower()})
        res['events'] = len(inside)
    print('PROBE ' + json.dumps(res), flush=True)


def probe_phase(model, mode, profile, timeout):
    kw = dict(model=model, mode=mode, device=dev, dtype=dt, shape='small' if dry_run else 'seed',
              batch_size=2 if dry_run else 50, accum=2, steps=2 if dry_run else 10, profile=profile)
    rc, text = run([sys.executable, '-c', f'import gpu_check; gpu_check.probe(**{kw!r})'], timeout,
                   os.path.join(work, f"probe_{model}_{mode}{'_profiled' if profile else ''}.log"))
    found = re.search(r'^PROBE (.*)$', text, re.M)
    if rc != 0 or not found:
        return {'ok': False, 'error': failed(rc, text), 'log': text}
    r = json.loads(found[1])
    r['mfu'] = r['flops_tok'] * r['tok_s'] / peak if peak else None
    return {'ok': True, **r}


# ----------------------------------------------------------------------------- report

def fmt(x, spec='.1f', none='-'):
    return none if x is None else format(x, spec)


def verdict(ok, measured):
    """(PASS/FAIL, what was measured), or 'not run' where the phase gave no figure."""
    return ('not run', '-') if ok is None else ('PASS' if ok else 'FAIL', measured)


def projection(results):
    """Hours of the full seed run here: seed_run_steps optimizer steps at train.py's measured step time (the seed's
    50 x 16 sequences, data loading included; bench.py's micro-step x 16 where that run failed), plus its evaluations
    (every 500 steps, 2 splits x 200 batches, a forward-only batch taken as a third of a training micro-step)."""
    tr, bench_rows = results.get('train learned', {}), results.get('bench', {}).get('rows', {})
    accum = 1 if dry_run else SEED_ACCUM
    if tr.get('step_s'):
        step_s, source = tr['step_s'], f"train.py's step time over its {tr['steps']}-step check"
    elif 'learned' in bench_rows:
        step_s, source = bench_rows['learned']['ms'] / 1000 * accum, f"bench.py's micro-step time x {accum}"
    else:
        return None, 'no step time was measured'
    evals_s = (seed_run_steps // 500 + 1) * 2 * 200 / 3 * step_s / accum
    return (seed_run_steps * step_s + evals_s) / 3600, f"{source}: {step_s * 1000:.1f} ms a step"


def report(results, started, device_name):
    R, lines = results, []
    add = lines.append
    tr = {k: R.get(k, {}) for k in ('train learned', 'train baseline', 'torchrun learned', 'torchrun baseline')}
    bench_rows = R.get('bench', {}).get('rows', {})
    hours, basis = projection(R)
    ratio_train = (tr['train learned']['step_s'] / tr['train baseline']['step_s']
                   if tr['train learned'].get('step_s') and tr['train baseline'].get('step_s') else None)
    ratio_bench = bench_rows.get('learned', {}).get('ratio')
    add(f"# GPU check: {device_name}\n")
    add(f"{time.strftime('%Y-%m-%d %H:%M')}; torch {torch.__version__}, CUDA {torch.version.cuda or '-'}; "
        f"peak bf16 {fmt(peak and peak / 1e12, '.0f')} TFLOP/s (datasheet, dense); {time.time() - started:.0f} s of "
        f"the {time_budget_s} s budget; data: {R.get('data', {}).get('detail', 'none')}.\n")
    if dry_run:
        add("**Dry run**: a CPU, tiny shapes, a few steps, dynamo's eager backend for torch.compile. The checks run as "
            "on a GPU; the figures, and so the goals, mean nothing here.\n")
    add("## Summary\n\n| check | result | measured |\n|---|---|---|")
    for k, x, ok, unit in (('projected seed run < %g h' % goal_hours, hours, hours is not None and hours < goal_hours, 'h'),
                           (f'learned/baseline <= {goal_ratio:.2f}x, bench.py', ratio_bench,
                            ratio_bench is not None and ratio_bench <= goal_ratio, 'x'),
                           (f'learned/baseline <= {goal_ratio:.2f}x, train.py step', ratio_train,
                            ratio_train is not None and ratio_train <= goal_ratio, 'x')):
        res, measured = verdict(None if x is None else ok, f"{fmt(x, '.2f')} {unit}")
        add(f"| {k} | {'n/a (dry run)' if dry_run and x is not None else res} | {measured} |")
    for k, r in tr.items():
        add(f"| {k}: loss falls | {verdict(r.get('falls'), '')[0]} | {r.get('falls_on') or '-'} |")
        n = r.get('recompiles_after')
        add(f"| {k}: no recompile after the first step | {verdict(None if n is None else n == 0, '')[0]} | "
            f"{fmt(n, 'd')} after, {fmt(r.get('recompiles'), 'd')} in all |")
    for model in ('learned', 'baseline'):
        r = R.get(f'sync {model}', {})
        ok = None if 'syncs' not in r else not r['syncs'] and not r['sync_warnings']
        add(f"| {model}: no host sync in one profiled step | {verdict(ok, '')[0]} | {fmt_syncs(r)} |")
    add("\n## Phases\n\n| phase | status | seconds | timeout s |\n|---|---|---|---|")
    for k, r in R.items():
        add(f"| {k} | {'ok' if r.get('ok') else 'FAILED: ' + str(r.get('error'))} | {r.get('seconds', 0):.0f} | "
            f"{r.get('timeout', 0):.0f} |")

    title = 'small shapes, eager, float32, micro-batch 2' if dry_run else 'seed shapes, compiled, bf16, micro-batch 50'
    add(f"\n## bench.py: {title}\n")
    for key in ('bench', 'bench variants'):
        b = R.get(key)
        if b is None or not b.get('rows'):
            add(f"{key}: no figures ({(b or {}).get('error', 'not run')})\n")
            continue
        add(f"`python {b['cmd']}`\n\n| model | ms/step | tokens/s | MFU | vs baseline | peak MiB | warm-up s |\n"
            f"|---|---|---|---|---|---|---|")
        for name, r in b['rows'].items():
            add(f"| {name} | {r['ms']:.1f} | {r['tok_s']:,.0f} | {pct(r['mfu'])} | "
                f"{fmt(r['ratio'], '.3f')}x | {fmt(r['mem_mib'], '.0f')} | {r['warmup_s']:.1f} |")
        if b.get('bench_hours') is not None:
            add(f"\nbench.py's own projection of the seed run (micro-steps only): {b['bench_hours']:.2f} h")
        add('')

    add("## Training: train.py alone and through torchrun --nproc_per_node=1\n")
    add("| run | steps done | loss first -> last | val loss | loss falls | recompiles after step 1 (all) | ms/step | "
        "tokens/s | MFU |\n|---|---|---|---|---|---|---|---|---|")
    for k, r in tr.items():
        mfu = r.get('tok_s') and peak and r['tok_s'] * bench_rows.get(k.split()[1], {}).get('gflop_tok', 0) * 1e9 / peak
        add(f"| {k} | {fmt(r.get('done'), 'd')}/{fmt(r.get('steps'), 'd')} | {fmt_loss(r)} | "
            f"{fmt_val(r)} | {'yes' if r.get('falls') else 'no'} | {fmt(r.get('recompiles_after'), 'd')} "
            f"({fmt(r.get('recompiles'), 'd')}) | {fmt(r.get('step_s') and r['step_s'] * 1000)} | "
            f"{fmt(r.get('tok_s'), ',.0f')} | {pct(mfu)} |")
    add(f"\nlearned/baseline step time in train.py: {fmt(ratio_train, '.3f')}x. Commands: "
        + '; '.join(f"`python {r['cmd']}`" for r in tr.values() if r.get('cmd')) + '\n')

    add("## Host syncs in one profiled training step (torch.profiler, torch.cuda.set_sync_debug_mode('warn'))\n")
    if dry_run:
        add("On a CPU the reads inside AdamW's step (.item() of its step counts, host memory) are left out; on CUDA "
            "train.py's fused AdamW reads nothing and every event counts.\n")
    add("| model | mode | profiled events | host syncs |\n|---|---|---|---|")
    for model in ('learned', 'baseline'):
        r = R.get(f'sync {model}', {})
        add(f"| {model} | {r.get('mode', '-')} | {fmt(r.get('events'), 'd')} | {fmt_syncs(r)} |")

    add("\n## Compile modes (learned model, 2 micro-steps an optimizer step)\n")
    ref = R.get('sync learned', {})
    add(f"| mode | first step s | ms/micro-step | tokens/s | MFU | vs {ref.get('mode', 'default')} | seed run h "
        f"(micro-steps only) | peak MiB |\n|---|---|---|---|---|---|---|---|")
    for k, r in [('sync learned', ref)] + [(k, r) for k, r in R.items() if k.startswith('mode ')]:
        if not r.get('ok'):
            add(f"| {k[5:] if k.startswith('mode ') else ref.get('mode', '-')} | failed: {r.get('error')} | | | | | | |")
            continue
        vs = ref['micro_step_s'] / r['micro_step_s'] if ref.get('micro_step_s') else None
        h = r['micro_step_s'] * SEED_ACCUM * seed_run_steps / 3600
        add(f"| {r['mode']} | {r['first_step_s']:.1f} | {r['micro_step_s'] * 1000:.2f} | {r['tok_s']:,.0f} | "
            f"{pct(r['mfu'])} | {fmt(vs, '.2f')}x speed | {h:.2f} | {fmt(r['mem_mib'], '.0f')} |")

    add("\n## Projected full seed run\n")
    add(f"{seed_run_steps:,} steps of config/learned_shift0.py (50 x 16 sequences of 200 tokens) on this "
        f"{'CPU (dry run: not a projection of anything)' if dry_run else 'GPU'}: **{fmt(hours, '.2f')} h** "
        f"(goal < {goal_hours:g} h on one H100-class GPU); from {basis}, evaluations included.\n")
    broken = [(k, r) for k, r in R.items() if not r.get('ok') and r.get('log')]
    if broken:
        add("## Logs of the failed phases (last lines)\n")
        for k, r in broken:
            add(f"### {k}\n\n```\n" + '\n'.join(r['log'].splitlines()[-25:]) + "\n```\n")
    return '\n'.join(lines) + '\n'


def pct(x):
    return f"{x * 100:.1f}%" if x else '-'


def fmt_loss(r):
    return f"{r['loss'][0]:.3f} -> {r['loss'][1]:.3f}" if r.get('loss') else '-'


def fmt_val(r):
    return f"{r['val'][0][1]:.3f} (step {r['val'][0][0]}) -> {r['val'][1][1]:.3f} (step {r['val'][1][0]})" \
        if r.get('val') else '-'


def fmt_syncs(r):
    if 'syncs' not in r:
        return f"not measured ({r.get('error', 'not run')})"
    found = [f"{n} x{c}" for n, c in r['syncs'].items()] + [f"warning: {w}" for w in r['sync_warnings']]
    return ', '.join(found) or 'none'


# ----------------------------------------------------------------------------- main

def main():
    global dev, dt, peak, work
    try:
        globals().update(configure({k: globals()[k] for k in (
            'dry_run', 'out', 'time_budget_s', 'data_dir', 'data', 'variants', 'train_steps', 'torchrun_steps',
            'compile_modes', 'seed_run_steps', 'goal_hours', 'goal_ratio', 'work_dir')}, sys.argv[1:], __file__,
            __doc__, RULES))
    except ConfigError as e:
        sys.exit(f"gpu_check.py: error: {e}")
    if not dry_run and not torch.cuda.is_available():
        sys.exit("gpu_check.py: error: no CUDA GPU: run with --dry_run=True to check the script on a CPU")
    if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        sys.exit(f"gpu_check.py: error: the report's folder {os.path.dirname(os.path.abspath(out))} does not exist")
    started = time.time()
    deadline = started + time_budget_s - 5  # 5 s kept for the report
    dev, dt = ('cpu', 'float32') if dry_run else ('cuda', 'bfloat16')
    device_name = f"{cpu_kind()} (dry run)" if dry_run else torch.cuda.get_device_name(0)
    peak = None if dry_run else gpu_peak(device_name)
    work = os.path.abspath(work_dir or tempfile.mkdtemp(prefix='gpu_check_'))
    os.makedirs(work, exist_ok=True)
    modes = ['eager'] if dry_run else [m for m in compile_modes.split(',') if m != 'default']
    sync_mode = 'dynamo' if dry_run else 'default'
    # (name, weight: its nominal share of the budget, function, arguments), most needed first
    plan = [('data', 0.04, data_phase, ()), ('bench', 0.22, bench_phase, ('learned,baseline',)),
            ('train learned', 0.12, train_phase, ('learned', 'config/learned_shift0.py', 'train')),
            ('train baseline', 0.12, train_phase, ('baseline', 'config/baseline.py', 'train')),
            ('sync learned', 0.04, probe_phase, ('learned', sync_mode, True)),
            ('sync baseline', 0.04, probe_phase, ('baseline', sync_mode, True)),
            ('torchrun learned', 0.07, train_phase, ('learned', 'config/learned_shift0.py', 'torchrun')),
            ('torchrun baseline', 0.07, train_phase, ('baseline', 'config/baseline.py', 'torchrun'))]
    if variants:
        plan.append(('bench variants', 0.12, bench_phase, ('baseline,' + variants,)))
    plan += [(f'mode {m}', 0.01 if m == 'eager' else 0.07, probe_phase, ('learned', m, False)) for m in modes]
    results = {}
    for i, (name, _, fn, args) in enumerate(plan):
        later = sum(w for _, w, _, _ in plan[i + 1:]) / sum(w for _, w, _, _ in plan)
        timeout = deadline - time.time() - 0.5 * later * time_budget_s
        t0 = time.time()
        if timeout < 3:
            results[name] = {'ok': False, 'error': 'skipped: the time budget was spent'}
            continue
        print(f"gpu_check: {name} (up to {timeout:.0f} s)", flush=True)
        try:
            results[name] = fn(*args, timeout=timeout)
        except Exception as e:  # recorded; the other phases still run
            results[name] = {'ok': False, 'error': f"{type(e).__name__}: {e}"}
        results[name].update(seconds=time.time() - t0, timeout=timeout)
    text = report(results, started, device_name)
    if not work_dir:
        shutil.rmtree(work, ignore_errors=True)

    def write(tmp):
        with open(tmp, 'w') as f:
            f.write(text)
    try:
        atomic_write(out, write, 'report')
    except RuntimeSetupError as e:
        sys.exit(f"gpu_check.py: error: {e}")
    print(f"gpu_check: wrote {out} in {time.time() - started:.0f} s")


if __name__ == '__main__':
    main()
