"""
What LearnedDropout costs: the full training step (forward, backward, AdamW) of the learned GPT
and of the baseline at the same data shapes, alternated in one process so that their ratio holds
on a noisy machine; then KV-cache generation against nanoGPT's full recompute.

$ python bench.py                               # seed and quick shapes, eager and compiled
$ python bench.py --shapes=seed --modes=compiled --batch_size=50
$ python bench.py --train=False                 # generation only
"""

import os
import runpy
import sys
import time

import torch

import baseline_model
import model as learned_model
from configurator import ConfigError, configure
from runtime import RuntimeSetupError, autocast, peak_flops, pick_device, pick_dtype, setup_device

HERE = os.path.dirname(os.path.abspath(__file__))
# -----------------------------------------------------------------------------
device = 'auto'  # 'auto' = cuda > mps > cpu
dtype = 'auto'  # 'auto' = bfloat16 on CUDA, float32 on CPU (the training default)
shapes = 'seed,quick'  # seed: the 26-layer models of METHOD.md section 6; quick: config/quick_*.py
modes = 'eager,compiled'  # eager and/or torch.compile
batch_size = 0  # micro-batch; 0: 50 (the seed's) on CUDA, 8 on CPU
steps = 4  # timed steps per model per round
rounds = 3  # rounds alternating learned and baseline; the median round counts
train = True  # benchmark the training step
generate = True  # benchmark KV-cache generation against full recompute
gen_shapes = 'quick'  # learned model shapes to generate with: quick and/or seed
gen_tokens = 256  # new tokens per generation (fewer where prompt + new would pass block_size)
gen_prompts = '1,128'  # prompt lengths to time
seed_run_steps = 26000  # for the projected wall time of a full seed run
seed_run_accum = 16  # micro-steps per step in the seed run (50 x 16 sequences)
# -----------------------------------------------------------------------------


def shape_args(name):
    """(learned GPTConfig kwargs, baseline GPTConfig kwargs) of a named shape, read from config/."""
    files = {'seed': ('learned_shift0.py', 'baseline.py'), 'quick': ('quick_learned.py', 'quick_baseline.py')}[name]
    out = []
    for f in files:
        c = runpy.run_path(os.path.join(HERE, 'config', f))
        args = dict(block_size=c.get('block_size', 200), vocab_size=50257, n_layer=c['n_layer'],
                    n_head=c['n_head'], n_embd=c['n_embd'], dropout=c.get('dropout', 0.0))
        if c['model_type'] == 'learned':
            args.update(shift_init=c['shift_init'], penalty_coeff=c['penalty_coeff'])
        out.append(args)
    return out


def build(kind, args, dev):
    module = learned_model if kind == 'learned' else baseline_model
    torch.manual_seed(0)
    m = module.GPT(module.GPTConfig(**args)).to(dev)
    return m, m.configure_optimizers(0.1, 9e-4, (0.9, 0.95), dev.split(':')[0])


def sync(dev):
    if dev.startswith('cuda'):
        torch.cuda.synchronize()


def make_step(m, opt, ctx):
    def step(x, y):
        with ctx:
            _, loss, _ = m(x, y, return_stats=True)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def cpu_peak_rss(kind, args, B, dt):
    """Peak resident memory (MiB, VmHWM) of a fresh process that runs this model's training step: on a
    CPU there is no allocator counter, and a shared process would mix both models' peaks (ru_maxrss
    would even carry this process's peak across fork+exec). glibc's default allocation (no
    setup_device) returns big buffers at once, so the peak is what was live at once."""
    import subprocess
    code = (f"import sys, torch; sys.path.insert(0, {HERE!r}); import bench, runtime; "
            f"torch.set_flush_denormal(True); m, o = bench.build({kind!r}, {args!r}, 'cpu'); "
            f"x = torch.randint(0, 50257, ({B}, {args['block_size']})); "
            f"s = bench.make_step(m, o, runtime.autocast({dt!r}, 'cpu')); s(x, x); s(x, x); "
            f"print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    return int(r.stdout.split()[-1]) / 1024 if r.returncode == 0 else float('nan')


def bench_train(shape, mode, dev, dt, B):
    """Median ms per training step of both models, alternating; plus memory, FLOPs, MFU."""
    largs, bargs = shape_args(shape)
    ctx = autocast(dt, dev.split(':')[0])
    T = largs['block_size']
    x = torch.randint(0, 50257, (B, T), device=dev)
    models, rows = {}, {}
    for kind, args in (('learned', largs), ('baseline', bargs)):
        m, opt = build(kind, args, dev)
        step = make_step(torch.compile(m) if mode == 'compiled' else m, opt, ctx)
        t0 = time.time()
        for _ in range(2):  # warm-up (and compilation)
            step(x, x)
        sync(dev)
        models[kind] = (m, step)
        rows[kind] = {'times': [], 'warmup_s': time.time() - t0}
    for _ in range(rounds):
        for kind, (m, step) in models.items():
            if dev.startswith('cuda'):
                torch.cuda.reset_peak_memory_stats(dev)
            sync(dev)
            t0 = time.time()
            for _ in range(steps):
                step(x, x)
            sync(dev)
            rows[kind]['times'].append((time.time() - t0) / steps)
            if dev.startswith('cuda'):
                rows[kind]['mem_mib'] = torch.cuda.max_memory_allocated(dev) / 2 ** 20
    peak = peak_flops(dev)
    for kind, (m, _) in models.items():
        r = rows[kind]
        r['s'] = sorted(r['times'])[len(r['times']) // 2]
        r['tok_s'] = B * T / r['s']
        r['flops_tok'] = m.flops_per_token()
        r['params'] = m.get_num_params()
        r['mfu'] = m.estimate_mfu(B, r['s'], peak) if peak else None
        if 'mem_mib' not in r:
            r['mem_mib'] = cpu_peak_rss(kind, (largs, bargs)[kind == 'baseline'], B, dt) if mode == 'eager' else None
    return rows


def bench_generate(shape, dev, dt):
    """Tokens/s of model.generate with the KV cache and with full recompute (learned model of the
    named shape, random weights: speed does not depend on them), for each prompt length."""
    largs, _ = shape_args(shape)
    m, _ = build('learned', largs, dev)
    m.eval()
    ctx = autocast(dt, dev.split(':')[0])
    out = []
    for n_prompt in (int(p) for p in gen_prompts.split(',')):
        n_new = max(1, min(gen_tokens, largs['block_size'] - n_prompt))  # past block_size both recompute
        idx = torch.randint(0, 50257, (1, n_prompt), device=dev)
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
    'dtype': "x in ('auto', 'float32', 'bfloat16', 'float16')",
    'shapes': ("len(x) > 0 and set(x.split(',')) <= {'seed', 'quick'}", "a comma-separated list of seed, quick"),
    'gen_shapes': ("len(x) > 0 and set(x.split(',')) <= {'seed', 'quick'}", "a comma-separated list of seed, quick"),
    'modes': ("len(x) > 0 and set(x.split(',')) <= {'eager', 'compiled'}", "a comma-separated list of eager, compiled"),
    'gen_prompts': ("all(p.strip().isdigit() and int(p) >= 1 for p in x.split(','))",
                    "a comma-separated list of prompt lengths >= 1, e.g. 1,128"),
    'batch_size': 'x >= 0', 'steps': 'x >= 1', 'rounds': 'x >= 1', 'gen_tokens': 'x >= 1',
    'seed_run_steps': 'x >= 1', 'seed_run_accum': 'x >= 1',
}


def main():
    try:
        globals().update(configure({k: globals()[k] for k in (
            'device', 'dtype', 'shapes', 'modes', 'batch_size', 'steps', 'rounds', 'train', 'generate',
            'gen_shapes', 'gen_tokens', 'gen_prompts', 'seed_run_steps', 'seed_run_accum')}, sys.argv[1:],
            __file__, __doc__, RULES))
        dev = pick_device(device)
    except (ConfigError, RuntimeSetupError) as e:
        sys.exit(f"bench.py: error: {e}")
    dev_type = dev.split(':')[0]
    dt = pick_dtype(dtype, dev_type)
    setup_device(dev_type)
    B = batch_size or (50 if dev_type == 'cuda' else 8)
    name = torch.cuda.get_device_name(dev) if dev_type == 'cuda' else f'{dev_type}, {torch.get_num_threads()} threads'
    print(f"device: {name}; dtype {dt}; torch {torch.__version__}")
    step_ratios, flop_ratios, gen_speedups = [], [], []
    if train:
        for shape in shapes.split(','):
            largs = shape_args(shape)[0]
            print(f"\n{shape} shapes: micro-batch {B} x {largs['block_size']} tokens")
            print(f"{'mode':9} {'model':9} {'params':>11} {'ms/step':>9} {'tok/s':>9} {'peak MiB':>9} "
                  f"{'GFLOP/tok':>9} {'MFU':>6} {'warm-up s':>9}")
            for mode in modes.split(','):
                rows = bench_train(shape, mode, dev, dt, B)
                for kind, r in rows.items():
                    mem = f"{r['mem_mib']:.0f}" if r['mem_mib'] is not None else '-'
                    mfu = f"{r['mfu'] * 100:.1f}%" if r['mfu'] is not None else '-'
                    print(f"{mode:9} {kind:9} {r['params']:>11,} {r['s'] * 1000:>9.1f} {r['tok_s']:>9,.0f} "
                          f"{mem:>9} {r['flops_tok'] / 1e9:>9.3f} {mfu:>6} {r['warmup_s']:>9.1f}")
                ratio = rows['learned']['s'] / rows['baseline']['s']
                flops = rows['learned']['flops_tok'] / rows['baseline']['flops_tok']
                print(f"{'':9} learned/baseline: step time {ratio:.3f}x, FLOPs {flops:.3f}x")
                step_ratios.append(f"{shape}/{mode} {ratio:.3f}x")
                if mode == modes.split(',')[0]:
                    flop_ratios.append(f"{shape} {flops:.3f}x")
                if shape == 'seed':
                    hours = seed_run_steps * seed_run_accum * (50 / B) * rows['learned']['s'] / 3600
                    print(f"{'':9} projected full seed run (learned, {seed_run_steps} steps of 50 x {seed_run_accum} "
                          f"sequences) on this device, {mode}: {hours:.1f} h")
    if generate:
        for shape in gen_shapes.split(','):
            print(f"\ngeneration: {shape} learned model, top_k 200")
            for n_prompt, n_new, cached, full in bench_generate(shape, dev, dt):
                print(f"prompt {n_prompt:4} + {n_new:4} new tokens: KV cache {cached:7.1f} tok/s, "
                      f"full recompute {full:7.1f} tok/s, speed-up {cached / full:.2f}x")
                gen_speedups.append(f"{shape} prompt {n_prompt} {cached / full:.2f}x")
    parts = [f"learned/baseline step time {', '.join(step_ratios)}", f"FLOP ratio {', '.join(flop_ratios)}",
             f"KV-cache generation speed-up {', '.join(gen_speedups)}"]
    print('summary: ' + '; '.join(p for p, on in zip(parts, (train, train, generate)) if on))


if __name__ == '__main__':
    main()
