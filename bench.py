"""
What LearnedDropout costs: the full training step (forward, backward, AdamW) of the learned GPT,
the baseline and the variants at the same data shapes, in one or more precisions, alternated in one
process so that their ratios hold on a noisy machine; then KV-cache generation against nanoGPT's
full recompute.

$ python bench.py                               # seed and quick shapes, eager and compiled
$ python bench.py --shapes=seed --modes=compiled --batch_size=50        # a GPU: bf16, the seed's micro-batch
$ python bench.py --dtype=float32,bfloat16 --generate=False             # CPU: what bf16 autocast buys
$ python bench.py --shapes=seed --models=learned,baseline,moe_params,moe_flops,learned_precomputed
$ python bench.py --train=False                 # generation only
"""

import dataclasses
import os
import re
import runpy
import sys
import time

import torch

from configurator import ConfigError, configure
from runtime import (RuntimeSetupError, autocast, check_memory, machine_name, model_module, peak_flops, pick_device,
                     pick_dtype, setup_device)

HERE = os.path.dirname(os.path.abspath(__file__))
# -----------------------------------------------------------------------------
device = 'auto'  # 'auto' = cuda > mps > cpu
dtype = 'auto'  # precision(s) to time, comma-separated, e.g. float32,bfloat16; 'auto' = bf16 on GPUs and CPUs with bf16 instructions
shapes = 'seed,quick'  # seed: the 26-layer models of METHOD.md section 6; quick: config/quick_*.py; small: SMALL_ARGS
models = 'learned,baseline'  # learned, baseline, and any config/<name>.py: moe_params at seed shapes, baseline_dropout0.2 at seed or small
modes = 'eager,compiled'  # eager and/or torch.compile
loss = 'chunked'  # the training loss's output layer: 'chunked' (train.py's, no whole logits) and/or 'full'
vocab_size = 0  # 0: each shape's own (quick: its config's 4,096-id data; seed: GPT-2's 50,257); or any size
batch_size = 0  # micro-batch; 0: 50 (the seed's) on CUDA, 8 on CPU
threads = 0  # CPU threads (torch.set_num_threads); 0: torch's default (one per core)
steps = 4  # timed steps per model per round
rounds = 3  # rounds alternating the models and dtypes; the median round counts
memory = True  # eager CPU runs: peak memory of each model's step in a fresh process
train = True  # benchmark the training step
generate = True  # benchmark KV-cache generation against full recompute
gen_shapes = 'quick'  # learned model shapes to generate with: quick and/or seed
gen_tokens = 256  # new tokens per generation (fewer where prompt + new would pass block_size)
gen_prompts = '1,128'  # prompt lengths to time
seed_run_steps = 26000  # for the projected wall time of a full seed run
seed_run_accum = 16  # micro-steps per step in the seed run (50 x 16 sequences)
# -----------------------------------------------------------------------------


SEED_FILES = {'learned': 'learned_shift0', 'baseline': 'baseline'}  # the other names are config/<name>.py
QUICK_FILES = {'learned': 'quick_learned', 'baseline': 'quick_baseline'}
CONFIG_NAMES = {f[:-3] for f in os.listdir(os.path.join(HERE, 'config')) if f.endswith('.py')}


# the reduced-scale study's candidate shapes: dispatch, not matmuls, bounds a step this small
SMALL_ARGS = {'learned': dict(block_size=128, vocab_size=2048, n_layer=4, n_embd=48, n_head=3),
              'baseline': dict(block_size=128, vocab_size=2048, n_layer=4, n_embd=52, n_head=4)}


class ShapeError(ValueError):
    """A model that has no such shape here; the message is one line."""


def model_spec(name, shape):
    """(model_type, GPTConfig kwargs) of a model name at a named shape, read from its config file:
    'learned' and 'baseline' at 'seed' or 'quick' shapes, any other config/<name>.py at its own (seed)
    shape; at 'small' shapes any learned or baseline config (its settings, e.g. dropout, at SMALL_ARGS)."""
    if shape == 'quick' and name not in QUICK_FILES:
        raise ShapeError(f"{name} has no quick shape (quick: {', '.join(QUICK_FILES)})")
    files = SEED_FILES if shape in ('seed', 'small') else QUICK_FILES
    c = runpy.run_path(os.path.join(HERE, 'config', files.get(name, name) + '.py'))
    model_type = c.get('model_type', 'learned')
    fields = {f.name for f in dataclasses.fields(model_module(model_type).GPTConfig)}
    cut = re.fullmatch(r'wiki_sample_v(\d+)', c.get('dataset', ''))  # a config on a cut vocabulary (the quick ones)
    args = dict(block_size=200, vocab_size=int(cut[1]) if cut else 50257)
    args.update({k: v for k, v in c.items() if k in fields and k != 'vocab_size'})
    if shape == 'small':
        if model_type not in SMALL_ARGS:
            raise ShapeError(f"{name} has no small shape (small: learned and baseline models)")
        args.update(SMALL_ARGS[model_type])
    if vocab_size:
        args['vocab_size'] = vocab_size
    return model_type, args


def build(model_type, args, dev):
    module = model_module(model_type)
    torch.manual_seed(0)
    m = module.GPT(module.GPTConfig(**args)).to(dev)
    return m, m.configure_optimizers(0.1, 9e-4, (0.9, 0.95), dev.split(':')[0])


def sync(dev):
    if dev.startswith('cuda'):
        torch.cuda.synchronize()


def make_step(m, opt, ctx, chunked=True):
    """train.py's step: forward with statistics, the loss in chunks without the whole logits (chunked=False:
    the full logits, then cross-entropy), AdamW."""
    def step(x, y):
        with ctx:
            loss = m(x, y, return_stats=True, return_logits=not chunked)[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def cpu_peak_rss(model_type, args, B, dt, chunked=True):
    """Peak resident memory (MiB, VmHWM) of a fresh process that runs this model's training step: on a
    CPU there is no allocator counter, and a shared process would mix the models' peaks (ru_maxrss
    would even carry this process's peak across fork+exec). glibc's default allocation (no
    setup_device) returns big buffers at once, so the peak is what was live at once."""
    import subprocess
    code = (f"import sys, torch; sys.path.insert(0, {HERE!r}); import bench, runtime; "
            f"torch.set_flush_denormal(True); m, o = bench.build({model_type!r}, {args!r}, 'cpu'); "
            f"x = torch.randint(0, {args['vocab_size']}, ({B}, {args['block_size']})); "
            f"s = bench.make_step(m, o, runtime.autocast({dt!r}, 'cpu'), {chunked!r}); s(x, x); s(x, x); "
            f"print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    return int(r.stdout.split()[-1]) / 1024 if r.returncode == 0 else float('nan')


def bench_train(shape, mode, dev, dtypes, B):
    """Median seconds per training step of every (model, dtype), alternating them round by round so
    that their ratios hold on a noisy machine; plus parameters, FLOPs, MFU and peak memory."""
    names, paths = models.split(','), loss.split(',')
    T, V = (model_spec(names[0], shape)[1][k] for k in ('block_size', 'vocab_size'))
    x = torch.randint(0, V, (B, T), device=dev)
    live, rows = {}, {}
    for name in names:
        model_type, args = model_spec(name, shape)
        for path in paths:  # with both loss paths, a model's label says which: learned/full
            label = name if len(paths) == 1 else f'{name}/{path}'
            for dt in dtypes:
                m, opt = build(model_type, args, dev)
                step = make_step(torch.compile(m) if mode == 'compiled' else m, opt, autocast(dt, dev.split(':')[0]),
                                 path == 'chunked')
                t0 = time.time()
                for _ in range(2):  # warm-up (and compilation)
                    step(x, x)
                sync(dev)
                live[label, dt] = (m, step, model_type, args, path == 'chunked')
                rows[label, dt] = {'times': [], 'warmup_s': time.time() - t0}
    for _ in range(rounds):
        for key, (m, step, *_) in live.items():
            if dev.startswith('cuda'):
                torch.cuda.reset_peak_memory_stats(dev)
            sync(dev)
            t0 = time.time()
            for _ in range(steps):
                step(x, x)
            sync(dev)
            rows[key]['times'].append((time.time() - t0) / steps)
            if dev.startswith('cuda'):
                rows[key]['mem_mib'] = torch.cuda.max_memory_allocated(dev) / 2 ** 20
    peak = peak_flops(dev)
    for (name, dt), (m, _, model_type, args, chunked) in live.items():
        r = rows[name, dt]
        r['s'] = sorted(r['times'])[len(r['times']) // 2]
        r['tok_s'] = B * T / r['s']
        r['flops_tok'] = m.flops_per_token()
        r['params'] = m.get_num_params()
        r['active'] = m.get_num_active_params() if hasattr(m, 'get_num_active_params') else r['params']
        r['mfu'] = m.estimate_mfu(B, r['s'], peak) if peak else None
        if 'mem_mib' not in r:
            r['mem_mib'] = cpu_peak_rss(model_type, args, B, dt, chunked) if mode == 'eager' and memory else None
    return rows


def bench_generate(shape, dev, dt):
    """Tokens/s of model.generate with the KV cache and with full recompute (learned model of the
    named shape, random weights: speed does not depend on them), for each prompt length."""
    _, largs = model_spec('learned', shape)
    m, _ = build('learned', largs, dev)
    m.eval()
    ctx = autocast(dt, dev.split(':')[0])
    out = []
    for n_prompt in (int(p) for p in gen_prompts.split(',')):
        n_new = max(1, min(gen_tokens, largs['block_size'] - n_prompt))  # past block_size both recompute
        idx = torch.randint(0, largs['vocab_size'], (1, n_prompt), device=dev)
        times = {True: [], False: []}
        for _ in range(rounds):
            for use_cache in (True, False):
                sync(dev)
                t0 = time.time()
                with ctx:
                    m.generate(idx, n_new, top_k=200, use_cache=use_cache)
                sync(dev)
                times[use_cache].append(time.time() - t0)
        cached, full = (sorted(times[k])[rounds // 2] for k in (True, False))
        out.append((n_prompt, n_new, n_new / cached, n_new / full))
    return out


RULES = {
    'dtype': ("len(x) > 0 and set(x.split(',')) <= {'auto', 'float32', 'bfloat16', 'float16'}",
              "a comma-separated list of auto, float32, bfloat16, float16"),
    'models': (f"len(x) > 0 and set(x.split(',')) <= {set(SEED_FILES) | CONFIG_NAMES!r}",
               "a comma-separated list of learned, baseline or the names of config/ files"),
    'threads': 'x >= 0', 'vocab_size': ('x == 0 or 257 <= x <= 65536', '0 or 257..65536 (ids are uint16)'),
    'shapes': ("len(x) > 0 and set(x.split(',')) <= {'seed', 'quick', 'small'}", "a comma-separated list of seed, quick, small"),
    'gen_shapes': ("len(x) > 0 and set(x.split(',')) <= {'seed', 'quick'}", "a comma-separated list of seed, quick"),
    'modes': ("len(x) > 0 and set(x.split(',')) <= {'eager', 'compiled'}", "a comma-separated list of eager, compiled"),
    'loss': ("len(x) > 0 and len(set(x.split(','))) == len(x.split(',')) and set(x.split(',')) <= {'chunked', 'full'}",
             "chunked, full or chunked,full"),
    'gen_prompts': ("all(p.strip().isdigit() and int(p) >= 1 for p in x.split(','))",
                    "a comma-separated list of prompt lengths >= 1, e.g. 1,128"),
    'batch_size': 'x >= 0', 'steps': 'x >= 1', 'rounds': 'x >= 1', 'gen_tokens': 'x >= 1',
    'seed_run_steps': 'x >= 1', 'seed_run_accum': 'x >= 1',
}


def main():
    try:
        globals().update(configure({k: globals()[k] for k in (
            'device', 'dtype', 'shapes', 'models', 'modes', 'loss', 'vocab_size', 'batch_size', 'threads', 'steps', 'rounds', 'memory',
            'train', 'generate', 'gen_shapes', 'gen_tokens', 'gen_prompts', 'seed_run_steps', 'seed_run_accum')},
            sys.argv[1:], __file__, __doc__, RULES))
        dev = pick_device(device)
    except (ConfigError, RuntimeSetupError) as e:
        sys.exit(f"bench.py: error: {e}")
    dev_type = dev.split(':')[0]
    dtypes = list(dict.fromkeys(pick_dtype(d, dev_type) for d in dtype.split(',')))
    setup_device(dev_type)
    if threads:
        torch.set_num_threads(threads)
    B = batch_size or (50 if dev_type == 'cuda' else 8)
    print(f"device: {machine_name(dev)}; dtype {', '.join(dtypes)}; torch {torch.__version__}")
    try:  # every shape and model exists, and its training step fits in memory, before anything is timed
        for shape in shapes.split(',') if train else []:
            for n in models.split(','):
                check_memory(*model_spec(n, shape), B, dev, "lower --batch_size")
    except (ShapeError, RuntimeSetupError) as e:
        sys.exit(f"bench.py: error: {e}")
    step_ratios, flop_ratios, dtype_speedups, gen_speedups, chunk_speedups = [], [], [], [], []
    if train:
        for shape in shapes.split(','):
            print(f"\n{shape} shapes: micro-batch {B} x {model_spec('learned', shape)[1]['block_size']} tokens")
            print(f"{'mode':9} {'dtype':9} {'model':19} {'params':>11} {'active':>11} {'ms/step':>9} {'tok/s':>9} "
                  f"{'peak MiB':>9} {'GFLOP/tok':>9} {'MFU':>6} {'warm-up s':>9}")
            for mode in modes.split(','):
                rows = bench_train(shape, mode, dev, dtypes, B)
                for (kind, d), r in rows.items():
                    mem = f"{r['mem_mib']:.0f}" if r['mem_mib'] is not None else '-'
                    mfu = f"{r['mfu'] * 100:.1f}%" if r['mfu'] is not None else '-'
                    print(f"{mode:9} {d:9} {kind:19} {r['params']:>11,} {r['active']:>11,} {r['s'] * 1000:>9.1f} "
                          f"{r['tok_s']:>9,.0f} {mem:>9} {r['flops_tok'] / 1e9:>9.3f} {mfu:>6} {r['warmup_s']:>9.1f}")
                for d in dtypes:
                    for (kind, d2), r in rows.items():
                        base_key = ('baseline' + kind[len(kind.split('/')[0]):], d)  # the same loss path
                        base = rows.get(base_key)
                        if d2 != d or (kind, d2) == base_key or base is None:
                            continue
                        ratio, flops = r['s'] / base['s'], r['flops_tok'] / base['flops_tok']
                        print(f"{'':9} {d:9} {kind}/baseline: step time {ratio:.3f}x, FLOPs {flops:.3f}x")
                        step_ratios.append(f"{shape}/{mode}/{d} {kind} {ratio:.3f}x")
                        if mode == modes.split(',')[0] and d == dtypes[0]:
                            flop_ratios.append(f"{shape} {kind} {flops:.3f}x")
                for (kind, d), r in rows.items():  # what the chunked loss buys (with loss=chunked,full)
                    if kind.endswith('/full') and (kind[:-5] + '/chunked', d) in rows:
                        up = r['s'] / rows[kind[:-5] + '/chunked', d]['s']
                        print(f"{'':9} {d:9} {kind[:-5]}: chunked loss is {up:.2f}x the speed of the full logits")
                        chunk_speedups.append(f"{shape}/{mode}/{d} {kind[:-5]} {up:.2f}x")
                for d in dtypes[1:]:
                    for kind in dict.fromkeys(k for k, _ in rows):
                        up = rows[kind, dtypes[0]]['s'] / rows[kind, d]['s']
                        print(f"{'':9} {kind}: {d} is {up:.2f}x the speed of {dtypes[0]}")
                        dtype_speedups.append(f"{shape}/{mode} {kind} {d} {up:.2f}x")
                for d in dtypes if shape == 'seed' else []:
                    if ('learned', d) in rows:
                        hours = seed_run_steps * seed_run_accum * (50 / B) * rows['learned', d]['s'] / 3600
                        print(f"{'':9} projected full seed run (learned, {d}, {seed_run_steps} steps of 50 x "
                              f"{seed_run_accum} sequences) on this device, {mode}: {hours:.1f} h")
    if generate:
        for shape in gen_shapes.split(','):
            print(f"\ngeneration: {shape} learned model, top_k 200")
            for n_prompt, n_new, cached, full in bench_generate(shape, dev, dtypes[0]):  # in the first dtype
                print(f"prompt {n_prompt:4} + {n_new:4} new tokens: KV cache {cached:7.1f} tok/s, "
                      f"full recompute {full:7.1f} tok/s, speed-up {cached / full:.2f}x")
                gen_speedups.append(f"{shape} prompt {n_prompt} {cached / full:.2f}x")
    parts = [(f"step time vs baseline {', '.join(step_ratios)}", train and step_ratios),
             (f"FLOP ratio {', '.join(flop_ratios)}", train and flop_ratios),
             (f"dtype speed-up {', '.join(dtype_speedups)}", train and dtype_speedups),
             (f"chunked-loss speed-up {', '.join(chunk_speedups)}", train and chunk_speedups),
             (f"KV-cache generation speed-up {', '.join(gen_speedups)}", generate)]
    print('summary: ' + '; '.join(p for p, on in parts if on))


if __name__ == '__main__':
    main()
