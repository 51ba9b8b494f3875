"""
Train the LearnedDropout GPT (model.py) or the baseline GPT (baseline_model.py).

One GPU or CPU:
$ python train.py config/learned_shift0.py --compile=True
Overrides and resume (same command plus init_from):
$ python train.py config/quick_learned.py --max_iters=1000 --init_from=resume
DDP, 4 GPUs on one node:
$ torchrun --standalone --nproc_per_node=4 train.py config/baseline.py

The defaults below are the seed runs' shared settings (METHOD.md, "The seed experiments").
"""

import os
import signal
import sys


def _stopped_early(signum, frame):
    # until the training loop's handler is installed (imports, data and config checks, model setup) a
    # signal means nothing was trained yet: leave at once. os._exit, not sys.exit: a SystemExit raised
    # inside a half-done `import torch` or `import numpy` can abort the interpreter's shutdown (SIGABRT);
    # start-up writes only whole files by rename, and the run lock is released by the kernel
    print(f"train.py: stopped by {signal.Signals(signum).name} during start-up; nothing was trained",
          file=sys.stderr, flush=True)
    os._exit(0)


signal.signal(signal.SIGTERM, _stopped_early)
signal.signal(signal.SIGINT, _stopped_early)

import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.distributed import destroy_process_group, init_process_group  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

from configurator import ConfigError, configure  # noqa: E402
from runtime import (CheckpointError, RunLock, RuntimeSetupError, autocast, clean_stale_tmp, peak_flops,  # noqa: E402
                     pick_device, pick_dtype, read_checkpoint, read_jsonl, save_json, save_torch, setup_device, atomic_write)

# -----------------------------------------------------------------------------
# default config values
# I/O
out_dir = 'out'  # checkpoints (ckpt.pt, best.pt), metrics.jsonl and config.json go here
eval_interval = 500  # evaluate (and checkpoint) every this many iterations
log_interval = 10  # log training statistics every this many iterations
eval_iters = 200  # batches per split in each evaluation (eval_windows='random')
eval_windows = 'random'  # 'random': eval_iters random batches (the seed's); 'all': the whole val split in non-overlapping windows
eval_only = False  # evaluate once, then exit
always_save_checkpoint = True  # write ckpt.pt at every evaluation, not only when val improves
init_from = 'scratch'  # 'scratch' or 'resume' (from out_dir/ckpt.pt)
overwrite = False  # allow init_from='scratch' into an out_dir that already holds a run (deletes its files)
# wandb logging
wandb_log = False  # off by default; when on, offline unless WANDB_MODE says otherwise
wandb_project = 'learned-dropout'  # wandb project name
wandb_run_name = None  # None: the config file's name
# data
data_dir = 'data'  # datasets prepared by prepare_wiki.py live in data_dir/dataset
dataset = 'wikipedia'  # a folder prepared by prepare_wiki.py: 'wikipedia', 'wiki_sample' or --name
gradient_accumulation_steps = 16  # micro-steps per optimizer step, summed over all DDP ranks
batch_size = 50  # micro-batch size per rank
block_size = 200  # context length
# model
model_type = 'learned'  # 'learned' (model.py), 'baseline' (baseline_model.py) or 'moe' (moe_model.py)
n_layer = 26  # transformer blocks
n_head = 9  # attention heads per block
n_embd = 144  # width of the residual stream
dropout = 0.0  # standard dropout rate (baseline and moe; must be 0 in the learned model)
bias = False  # biases in Linear and LayerNorm layers
shift_init = 0.0  # learned: initial shift b of the mask's cosine, in [0, pi]
dropout_n_head = None  # learned: heads of the mask attention (None: n_head)
penalty_coeff = 0.1  # learned: weight of mean(M^2/2) in the loss (0: no penalty)
mask_input = 'mlp_output'  # learned: the mask attends over 'mlp_output' (the method) or 'embedding' (pre-computed)
detach_mask_input = False  # learned, mask_input='embedding': detach the shared mask input (the author's code did)
mask_fourier_terms = 1  # learned: terms K of the cosine series mapping z to M (1: the method's single cosine)
mask_rounding = 'stochastic'  # learned: 'stochastic' (the method) or 'soft' (output f * M, no rounding: a control)
n_expert = 8  # moe: experts per MLP
expert_top_k = 2  # moe: experts chosen per token
expert_hidden = 0  # moe: hidden units per expert (0: 4 * n_embd // n_expert, the dense MLP split)
moe_aux_coeff = 0.01  # moe: weight of the load-balancing loss in training
router_z_coeff = 0.0  # moe: weight of the router z-loss in training (0: off)
# adamw optimizer
learning_rate = 9e-4  # max learning rate
max_iters = 26000  # total optimizer steps
weight_decay = 0.1  # on >= 2-D parameters only
beta1 = 0.9  # AdamW beta1
beta2 = 0.95  # AdamW beta2
grad_clip = 0.0  # clip gradients at this norm, 0: no clipping
# learning rate schedule
decay_lr = True  # linear warmup then cosine decay; False: constant learning_rate
warmup_iters = 300  # linear warmup steps
lr_decay_iters = 700000  # cosine reaches min_lr here (the seed's 700k makes it nearly constant)
min_lr = 9e-5  # learning rate at the end of the cosine
# system
backend = 'auto'  # DDP backend: 'auto' = nccl on CUDA, gloo otherwise
device = 'auto'  # 'auto' = cuda > mps > cpu; or e.g. 'cpu', 'cuda:1'
dtype = 'auto'  # 'auto' = bf16 autocast on GPUs and on CPUs with bf16 instructions (AVX512-BF16, AMX); else float32
compile = True  # torch.compile the model, as the seed runs did (a cold compile takes 20 s to 2 minutes on a CPU)
seed = 1337  # model init, mask noise and batch order
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str, type(None)))]


def fail(message, code=1):
    """One line on stderr, then exit: for problems the user can fix."""
    print(f"train.py: error: {message}", file=sys.stderr)
    sys.exit(code)


RULES = {
    'model_type': "x in ('learned', 'baseline', 'moe')", 'init_from': "x in ('scratch', 'resume')",
    'eval_windows': "x in ('random', 'all')",
    'dtype': "x in ('auto', 'float32', 'bfloat16', 'float16')", 'backend': "x in ('auto', 'nccl', 'gloo')",
    'mask_input': "x in ('mlp_output', 'embedding')", 'mask_rounding': "x in ('stochastic', 'soft')",
    'eval_interval': 'x >= 1', 'log_interval': 'x >= 1', 'eval_iters': 'x >= 1', 'batch_size': 'x >= 1',
    'block_size': 'x >= 1', 'gradient_accumulation_steps': 'x >= 1', 'n_layer': 'x >= 1', 'n_head': 'x >= 1',
    'n_embd': 'x >= 1', 'max_iters': 'x >= 0', 'warmup_iters': 'x >= 0', 'lr_decay_iters': 'x >= 0',
    'dropout': '0 <= x < 1', 'shift_init': ('0 <= x <= math.pi', 'in [0, pi]'),
    'dropout_n_head': ('x is None or type(x) is int and x >= 1', 'None (= n_head) or an int >= 1'),
    'penalty_coeff': 'x >= 0', 'mask_fourier_terms': 'x >= 1', 'n_expert': 'x >= 1', 'expert_top_k': 'x >= 1',
    'expert_hidden': 'x >= 0', 'moe_aux_coeff': 'x >= 0', 'router_z_coeff': 'x >= 0',
    'learning_rate': 'x > 0', 'min_lr': 'x >= 0', 'weight_decay': 'x >= 0', 'beta1': '0 <= x < 1',
    'beta2': '0 <= x < 1', 'grad_clip': ('x >= 0', '>= 0 (0: no clipping)'),
    'out_dir': ('len(x) > 0', 'a folder name'), 'dataset': ('len(x) > 0', 'a dataset name'),
}
try:
    cli_args = sys.argv[1:]
    config = configure({k: globals()[k] for k in config_keys}, cli_args, __file__, __doc__, RULES)
except ConfigError as e:
    fail(str(e), code=2)
globals().update(config)
if decay_lr and lr_decay_iters <= warmup_iters:
    fail(f"lr_decay_iters ({lr_decay_iters}) must be larger than warmup_iters ({warmup_iters}), or set decay_lr=False",
         code=2)
if wandb_run_name is None:
    config_files = [a for a in cli_args if not a.startswith('--')]
    wandb_run_name = os.path.splitext(os.path.basename(config_files[-1]))[0] if config_files else model_type
    config['wandb_run_name'] = wandb_run_name
# -----------------------------------------------------------------------------
# devices, DDP, precision

ddp = int(os.environ.get('RANK', -1)) != -1  # launched by torchrun?
try:
    device = pick_device(device)
except RuntimeSetupError as e:
    fail(str(e), code=2)
if ddp:
    ddp_rank, ddp_local_rank, ddp_world_size = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE'))
    if device.startswith('cuda'):
        device = f'cuda:{ddp_local_rank}'
        torch.cuda.set_device(device)
    init_process_group(backend=('nccl' if device.startswith('cuda') else 'gloo') if backend == 'auto' else backend)
    if gradient_accumulation_steps % ddp_world_size:
        fail(f"gradient_accumulation_steps ({gradient_accumulation_steps}) must be divisible by the "
             f"number of processes ({ddp_world_size})", code=2)
    gradient_accumulation_steps //= ddp_world_size
else:
    ddp_rank, ddp_world_size = 0, 1
master_process = ddp_rank == 0
device_type = 'cuda' if device.startswith('cuda') else device.split(':')[0]
tokens_per_iter = gradient_accumulation_steps * ddp_world_size * batch_size * block_size
torch.manual_seed(seed + ddp_rank)  # the learned masks' noise differs per rank
setup_device(device_type)
peak = peak_flops(device)

# -----------------------------------------------------------------------------
# data: uniformly random windows of the memmapped token files

data_path = os.path.join(data_dir, dataset)


def missing_data_hint():
    """What to run when data_path is not prepared: the preparation, and for the full Wikipedia (which
    needs the Hugging Face Hub) the offline way to try the same model on the embedded sample."""
    where = f" --data_dir={data_dir}" if data_dir != 'data' else ''
    if dataset == 'wiki_sample':
        return f"run 'python prepare_wiki.py --source=sample{where}'"
    if dataset != 'wikipedia':
        return f"run 'python prepare_wiki.py --source=files --files YOUR_FILES --name={dataset}{where}'"
    name = os.path.splitext(os.path.basename(config['wandb_run_name'] or 'run'))[0]
    return (f"run 'python prepare_wiki.py --max_tokens=42600000{where}' (streams Wikipedia from the Hugging Face Hub); "
            f"offline, try this model on the embedded sample: 'python prepare_wiki.py --source=sample{where}' then "
            f"'python train.py {' '.join(a for a in cli_args if not a.startswith('--dataset='))} --dataset=wiki_sample "
            f"--out_dir=out/try_{name} --batch_size=8 --gradient_accumulation_steps=1 --max_iters=200 "
            f"--eval_interval=50 --eval_iters=10 --compile=False'")


if not all(os.path.exists(os.path.join(data_path, f)) for f in ('train.bin', 'val.bin', 'meta.json')):
    fail(f"no prepared data in {data_path}: {missing_data_hint()}")
try:
    with open(os.path.join(data_path, 'meta.json')) as f:
        meta = json.load(f)
    vocab_size = int(meta['vocab_size'])
    # data tokenized with GPT-2 cut to its first N ranks (reproduce.py's) says so; the checkpoints carry it
    # so that sample.py and plot.py encode and decode text with that tokenizer (None: GPT-2's own)
    tokenizer_cut = meta.get('tokenizer_cut')
    expected_tokens = {split: int(meta[f'{split}_tokens']) for split in ('train', 'val')}
except (OSError, ValueError, TypeError, KeyError) as e:
    what = f"has no {e}" if isinstance(e, KeyError) else f"cannot be read ({type(e).__name__})"
    fail(f"{data_path}/meta.json {what}: the preparation is incomplete or damaged; run prepare_wiki.py again "
         f"with --force")
dtype = pick_dtype(dtype, device_type)
ctx = autocast(dtype, device_type)
for split in ('train', 'val'):
    n_tokens = os.path.getsize(os.path.join(data_path, f'{split}.bin')) // 2
    if n_tokens != expected_tokens[split]:
        fail(f"{data_path}/{split}.bin has {n_tokens} tokens but meta.json says {expected_tokens[split]}: "
             f"the preparation is incomplete; run prepare_wiki.py again with --force")
    if n_tokens <= block_size:
        fail(f"{data_path}/{split}.bin has {n_tokens} tokens, too few for block_size={block_size}; "
             f"use a smaller block_size or more data")
    # one vectorised pass: an id outside the vocabulary would fail deep inside the embedding much later
    top = int(np.memmap(os.path.join(data_path, f'{split}.bin'), dtype=np.uint16, mode='r').max())
    if top >= vocab_size:
        fail(f"{data_path}/{split}.bin holds token id {top} but meta.json's vocab_size is {vocab_size}: the data "
             f"and its meta.json do not belong together; run prepare_wiki.py again with --force")
batch_gen = torch.Generator().manual_seed(seed + ddp_rank)  # training windows, saved for exact resume
window = np.arange(block_size + 1)


def get_batch(split, generator):
    # a new memmap each call: a long-lived one keeps growing in memory (numpy issue)
    data = np.memmap(os.path.join(data_path, f'{split}.bin'), dtype=np.uint16, mode='r')
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator).numpy()
    w = torch.from_numpy(data[ix[:, None] + window].astype(np.int64))  # (B, T+1)
    x, y = w[:, :-1], w[:, 1:]
    if device_type == 'cuda':
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def get_eval_batches(split):
    """eval_windows='all': the split's non-overlapping windows in order (a last partial one is left out), in
    batches of up to batch_size. The train split is capped at val's number of windows, spread evenly over it."""
    data = np.memmap(os.path.join(data_path, f'{split}.bin'), dtype=np.uint16, mode='r')
    starts = np.arange((len(data) - 1) // block_size) * block_size
    n_val = (expected_tokens['val'] - 1) // block_size
    if split == 'train' and len(starts) > n_val:
        starts = starts[np.linspace(0, len(starts) - 1, n_val).round().astype(np.int64)]
    for i in range(0, len(starts), batch_size):
        w = torch.from_numpy(data[starts[i:i + batch_size, None] + window].astype(np.int64))  # (B, T+1)
        yield w[:, :-1].to(device), w[:, 1:].to(device)


# -----------------------------------------------------------------------------
# model, optimizer, checkpoint

if model_type == 'learned':
    import model as model_module
elif model_type == 'moe':
    import moe_model as model_module
else:
    import baseline_model as model_module
# the model's own fields, from the globals above (vocab_size from the data's meta.json)
model_args = {f.name: globals()[f.name] for f in dataclasses.fields(model_module.GPTConfig)}
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
metrics_path = os.path.join(out_dir, 'metrics.jsonl')
resume_cmd = ' '.join(['python train.py'] + [a for a in cli_args if not a.startswith('--init_from=')]
                      + ['--init_from=resume'])

# the run folder: one run at a time in it, and nothing an earlier run wrote is lost by mistake
if master_process:
    try:
        os.makedirs(out_dir, exist_ok=True)
        run_lock = RunLock(out_dir)  # held until the process exits
    except RuntimeSetupError as e:
        fail(str(e))
    except OSError as e:
        fail(f"cannot write to out_dir {out_dir}: {e.strerror or e}")
    clean_stale_tmp(out_dir)  # temporaries of a killed run
    earlier = [f for f in ('ckpt.pt', 'best.pt', 'metrics.jsonl') if os.path.exists(os.path.join(out_dir, f))]
    if init_from == 'scratch' and earlier:
        if not overwrite:
            fail(f"{out_dir} already holds a run ({', '.join(earlier)}); continue it with --init_from=resume, "
                 f"train into another --out_dir, or start it over with --overwrite=True (deletes those files)", code=2)
        for f in earlier:
            os.remove(os.path.join(out_dir, f))
checkpoint = None
if init_from == 'resume':
    try:
        checkpoint = read_checkpoint(ckpt_path)
    except CheckpointError as e:
        fail(str(e))
    if checkpoint.get('model_type') != model_type:
        fail(f"{ckpt_path} holds a {checkpoint.get('model_type')!r} model but model_type={model_type!r}: "
             f"resume with the config the run was started with")
    for k, v in checkpoint['model_args'].items():
        if model_args.get(k) != v:
            fail(f"{ckpt_path} was trained with {k}={v!r} but this run has {k}={model_args.get(k)!r}: "
                 f"resume with the config the run was started with")
    if checkpoint['iter_num'] >= max_iters and not eval_only:
        if master_process:
            longer = ' '.join(['python train.py'] + [a for a in cli_args if not a.startswith('--max_iters=')]
                              + [f"--max_iters={2 * checkpoint['iter_num']}"])
            print(f"{out_dir}: the run is complete ({checkpoint['iter_num']} of max_iters={max_iters} iterations); "
                  f"to train it longer, resume with a larger max_iters: {longer}")
        sys.exit(0)
try:
    gptconf = model_module.GPTConfig(**model_args)
except ValueError as e:
    fail(f"bad model configuration: {e}", code=2)
model = model_module.GPT(gptconf)
model.to(device)
scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
iter_num, best_val_loss, evaluated_at = 0, float('inf'), -1
if checkpoint is not None:
    model.load_state_dict(checkpoint['model'])
    optimizer.load_state_dict(checkpoint['optimizer'])
    scaler.load_state_dict(checkpoint['scaler'])
    iter_num, best_val_loss, evaluated_at = checkpoint['iter_num'], checkpoint['best_val_loss'], checkpoint['evaluated_at']
    rng = checkpoint['rng'][ddp_rank] if len(checkpoint['rng']) == ddp_world_size else None
    if rng is None:
        print(f"warning: {ckpt_path} was written by {len(checkpoint['rng'])} process(es), this run has "
              f"{ddp_world_size}: random streams restart from the seed")
    else:
        torch.set_rng_state(rng['torch'])
        batch_gen.set_state(rng['batch'])
        if device_type == 'cuda':
            torch.cuda.set_rng_state(rng['cuda'], device)
    checkpoint = None  # free the memory
raw_model = model
if compile:
    model = torch.compile(model)
train_model = DDP(model, device_ids=[ddp_local_rank] if device_type == 'cuda' else None) if ddp else model


def rng_state():
    """This rank's random streams: the model's noise (masks, dropout) and the batch sampler."""
    state = {'torch': torch.get_rng_state(), 'batch': batch_gen.get_state()}
    if device_type == 'cuda':
        state['cuda'] = torch.cuda.get_rng_state(device)
    return state


def save_checkpoint(path, with_optimizer=True):
    """Written to a temporary name and renamed, so an interrupted save never clobbers a good file.
    Every rank must call it (the RNG states are gathered); rank 0 writes."""
    states = [None] * ddp_world_size
    checksums = [None] * ddp_world_size
    if ddp:
        torch.distributed.all_gather_object(states, {k: v.cpu() for k, v in rng_state().items()})
        # replicas must hold identical weights (all-reduced gradients, same optimizer): check it here,
        # where the loop syncs anyway, rather than save one replica of a silently split model
        checksum = sum(p.detach().double().square().sum().item() for p in raw_model.parameters())
        torch.distributed.all_gather_object(checksums, checksum)
        if len(set(checksums)) != 1:
            fail(f"the DDP replicas' weights differ at iter {iter_num} (checksums {checksums}); gradients are not "
                 f"being all-reduced")
    else:
        states[0] = rng_state()
    if not master_process:
        return
    ckpt = {'model': raw_model.state_dict(), 'model_type': model_type, 'model_args': model_args,
            'iter_num': iter_num, 'best_val_loss': best_val_loss, 'evaluated_at': evaluated_at,
            'config': config, 'rng': states, 'tokenizer_cut': tokenizer_cut, 'replica_checksums': checksums}
    if with_optimizer:
        ckpt.update(optimizer=optimizer.state_dict(), scaler=scaler.state_dict())
    try:
        save_torch(ckpt, path)
    except RuntimeSetupError as e:
        fail(str(e))


@torch.no_grad()
def estimate_loss():
    """Pure cross-entropy (eval mode: deterministic masks, no dropout) on the same windows of each
    split every time (eval_iters random batches, or every window of the split), plus the learned
    model's eval-mode mask statistics; every window weighs the same."""
    out = {}
    model.eval()
    for split in ('train', 'val'):
        if eval_windows == 'all':
            batches = get_eval_batches(split)
        else:
            gen = torch.Generator().manual_seed(seed + 1)  # fixed eval batches: comparable across evaluations
            batches = (get_batch(split, gen) for _ in range(eval_iters))
        sums, weight = {}, 0.0
        for X, Y in batches:
            with ctx:
                _, _, stats = model(X, Y, return_stats=True)
            w = len(X) / batch_size  # 1 but for a last, smaller batch of windows
            sums = {k: sums.get(k, 0) + v.float() * w for k, v in stats.items()}
            weight += w
        out.update(summarize({k: v / weight for k, v in sums.items()}, f'{split}/'))
    model.train()
    return out


PER_LAYER = ('keep', 'moe_aux', 'load_entropy', 'expert_load')  # statistics also logged layer by layer


def summarize(stats, prefix=''):
    """A record from a model's stats: each per-layer tensor as its mean over layers, and for the
    PER_LAYER ones also the whole list; 'ce' is named 'loss' in evaluations. Syncs (tolist)."""
    out = {}
    for k, v in stats.items():
        name = 'loss' if k == 'ce' and prefix else k
        v = v.float()
        out[prefix + name] = v.mean(0).tolist() if v.dim() else v.item()
        if k in PER_LAYER:
            out[f'{prefix}{k}_per_layer'] = v.tolist()
    return out


def get_lr(it):
    if it < warmup_iters:  # linear warmup
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


# -----------------------------------------------------------------------------
# logging: console, out_dir/metrics.jsonl, optionally wandb

wandb = None


def trim_metrics():
    """On resume, drop what the interrupted run logged after its checkpoint: it is about to be
    redone. Training records carry the iteration that ran; evaluations the iteration before which
    they ran."""
    records = read_jsonl(metrics_path)
    kept = [r for r in records if r['iter'] < iter_num or (r['iter'] == evaluated_at == iter_num and 'val/loss' in r)]
    save_json_lines(kept, metrics_path)


def save_json_lines(records, path):
    def write(tmp):
        with open(tmp, 'w') as f:
            f.writelines(json.dumps(r) + '\n' for r in records)
    atomic_write(path, write, 'metrics file')


if master_process:
    try:
        if init_from == 'resume' and os.path.exists(metrics_path):
            trim_metrics()
        save_json(dict(config, vocab_size=vocab_size, tokenizer_cut=tokenizer_cut, dtype=dtype, device=device, world_size=ddp_world_size,
                       tokens_per_iter=tokens_per_iter, num_params=raw_model.get_num_params()),
                  os.path.join(out_dir, 'config.json'), 'config.json')
    except RuntimeSetupError as e:
        fail(str(e))
    if wandb_log:
        os.environ.setdefault('WANDB_MODE', 'offline')  # online needs a key and a network
        try:
            import wandb
        except ImportError:
            fail("wandb_log=True needs wandb: pip install wandb", code=2)
        wandb.init(project=wandb_project, name=wandb_run_name, config=config)
    print(f"{model_type} model, {raw_model.get_num_params():,} parameters, {dtype} on {device}"
          f"{f' x {ddp_world_size} processes' if ddp else ''}, {tokens_per_iter:,} tokens per iteration")


def log(record):
    if not master_process:
        return
    with open(metrics_path, 'a') as f:
        f.write(json.dumps(record) + '\n')
    if wandb is not None:
        wandb.log(record, step=record['iter'])


# -----------------------------------------------------------------------------
# stopping: SIGINT/SIGTERM finish the step, save and exit; a non-finite loss stops the run

stop_signal = None


def request_stop(signum, frame):
    global stop_signal
    stop_signal = signal.Signals(signum).name


signal.signal(signal.SIGINT, request_stop)
signal.signal(signal.SIGTERM, request_stop)


def check_finite(bad_iter):
    """bad_iter: device tensor, the first iteration whose loss was nan/inf, or -1. Reading it syncs,
    so this runs only where the loop syncs anyway (logging, evaluation, saving)."""
    bad = int(bad_iter)
    if bad >= 0:
        kept = f"the last good checkpoint {ckpt_path} is untouched" if os.path.exists(ckpt_path) else "no checkpoint was written"
        fail(f"the loss became nan/inf at iter {bad}; stopping ({kept}). "
             f"Try a lower learning_rate, grad_clip=1.0 or dtype='float32'")


# -----------------------------------------------------------------------------
# training loop

bad_iter = torch.tensor(-1, device=device)
t_log, iters_since_log, first_step, avg_dt = time.time(), 0, True, None
if compile and iter_num < max_iters and not eval_only and master_process:
    print("compiling the model: the first step takes a while (20 s to 2 minutes on a CPU)", flush=True)
while True:
    lr = get_lr(iter_num) if decay_lr else learning_rate
    for param_group in optimizer.param_groups:
        param_group['lr'] = lr

    due = iter_num % eval_interval == 0 or iter_num == max_iters
    if (due and iter_num != evaluated_at) or eval_only:  # a resumed run does not redo its checkpoint's eval
        check_finite(bad_iter)
        if master_process:
            losses = estimate_loss()
            evaluated_at = iter_num
            keep = f", val keep {losses['val/keep']:.4f}" if 'val/keep' in losses else ''
            print(f"step {iter_num}/{max_iters}: train loss {losses['train/loss']:.4f}, "
                  f"val loss {losses['val/loss']:.4f}{keep}")
            log({'iter': iter_num, **losses, 'lr': lr})
            improved = losses['val/loss'] < best_val_loss
            best_val_loss = min(best_val_loss, losses['val/loss'])
        else:
            improved = False
        if ddp:  # every rank takes part in the save (RNG states are gathered)
            flag = torch.tensor([float(improved), best_val_loss], device=device)
            torch.distributed.broadcast(flag, 0)
            improved, best_val_loss = bool(flag[0]), float(flag[1])
            evaluated_at = iter_num
        if iter_num > 0 and not eval_only:
            # best.pt first: a kill between the two writes never leaves ckpt.pt's best_val_loss ahead of it
            if improved:
                save_checkpoint(os.path.join(out_dir, 'best.pt'), with_optimizer=False)
            if always_save_checkpoint or improved:
                save_checkpoint(ckpt_path)
        t_log, iters_since_log = time.time(), 0  # step times exclude evaluation and saving
    if iter_num >= max_iters or eval_only:
        break

    # one optimizer step over gradient_accumulation_steps micro-batches; no host sync in here
    log_step = iter_num % log_interval == 0
    stat_sums = {}
    loss_sum = torch.zeros((), device=device)
    for micro_step in range(gradient_accumulation_steps):
        if ddp:  # all-reduce the gradients only once, on the last micro-step
            train_model.require_backward_grad_sync = micro_step == gradient_accumulation_steps - 1
        X, Y = get_batch('train', batch_gen)
        with ctx:
            # [1:]: the (B, T, vocab) logits are not kept alive through backward
            loss, stats = train_model(X, Y, return_stats=True)[1:]
            loss = loss / gradient_accumulation_steps
        scaler.scale(loss).backward()
        loss_sum += loss.detach()
        if log_step:
            stat_sums = {k: stat_sums.get(k, 0) + v.float() for k, v in stats.items()}
    if grad_clip != 0.0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    bad_iter = torch.where((bad_iter < 0) & ~torch.isfinite(loss_sum), iter_num, bad_iter)
    iter_num += 1
    iters_since_log += 1
    first_step_s = None
    if first_step:  # compilation and warm-up: reported on their own, kept out of the step times
        float(loss_sum)  # wait for the step to finish: one sync, once
        first_step, first_step_s = False, time.time() - t_log
        t_log, iters_since_log = time.time(), 0

    if log_step and master_process:
        check_finite(bad_iter)  # syncs, as the .tolist() below would
        record = {'iter': iter_num - 1, 'loss': loss_sum.item(),
                  **summarize({k: v / gradient_accumulation_steps for k, v in stat_sums.items()})}
        line = f"iter {iter_num - 1}/{max_iters}: loss {record['loss']:.4f}"
        if 'keep' in record:
            line += f", ce {record['ce']:.4f}, penalty {record['penalty']:.4f}, keep {record['keep']:.4f}"
        if 'load_entropy' in record:
            line += f", ce {record['ce']:.4f}, load entropy {record['load_entropy']:.3f}"
        record['lr'] = lr
        line += f", lr {lr:.2e}"
        if first_step_s is not None:
            record['first_step_s'] = first_step_s
            line += f", first step {first_step_s:.1f} s (compilation and warm-up)"
        elif iters_since_log:
            dt = (time.time() - t_log) / iters_since_log
            t_log, iters_since_log = time.time(), 0
            avg_dt = dt if avg_dt is None else 0.7 * avg_dt + 0.3 * dt
            eta = avg_dt * (max_iters - iter_num)
            record.update(ms_per_iter=dt * 1000, tokens_per_s=tokens_per_iter / dt)
            line += f", {dt * 1000:.1f} ms/iter, {tokens_per_iter / dt:,.0f} tok/s"
            if peak is not None:  # one GPU's share of the work against one GPU's peak
                record['mfu'] = raw_model.estimate_mfu(batch_size * gradient_accumulation_steps, dt, peak)
                line += f", mfu {record['mfu'] * 100:.1f}%"
            line += f", ETA {int(eta // 3600)}:{int(eta % 3600 // 60):02d}:{int(eta % 60):02d}"
        print(line, flush=True)
        log(record)

    stop = stop_signal is not None
    if ddp and log_step:  # agree on stopping only where the loop syncs anyway
        flag = torch.tensor(float(stop), device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        stop = bool(flag)
    elif ddp:
        stop = False
    if stop:
        check_finite(bad_iter)
        save_checkpoint(ckpt_path)
        if master_process:
            print(f"stopped by {stop_signal or 'a signal'} after iter {iter_num - 1}; saved {ckpt_path}. "
                  f"Resume with: {resume_cmd}")
        break

if master_process and wandb is not None:
    wandb.finish()
if ddp:
    # every rank past its last collective before the group is torn down: a rank that tears down gloo while
    # the other is still saving can die with "terminate called without an active exception" (SIGABRT)
    torch.distributed.barrier()
    destroy_process_group()
