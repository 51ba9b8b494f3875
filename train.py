"""
Train the LearnedDropout GPT (model.py), the baseline GPT (baseline_model.py) or the MoE GPT (moe_model.py).

One GPU or CPU:
$ python train.py config/learned_shift0.py --compile=True
Overrides and resume (same command plus init_from):
$ python train.py config/quick_learned.py --max_iters=1000 --init_from=resume
DDP, 4 GPUs on one node:
$ torchrun --standalone --nproc_per_node=4 train.py config/baseline.py

The defaults below are the seed runs' shared settings (METHOD.md, "The seed experiments"); the model's
own settings are the fields of its GPTConfig, listed by --help with the rest.

A run writes ckpt.pt (latest, with optimizer and RNG states: a resumed run repeats the uninterrupted
one exactly), best.pt (model only), metrics.jsonl and config.json to out_dir. Nothing is lost by
mistake: out_dir is locked while a run uses it; training from scratch over a run is refused unless
--overwrite=True, and even then only after configuration, data and model have been checked; every
file is written to a temporary name and renamed (a kill or a full disk leaves the previous one whole).
SIGINT/SIGTERM finish the step, save, print the resume command and exit with 128 + the signal; a nan/inf loss stops the run
before anything is saved. With torchrun, rank 0 logs and saves; every save checks the replicas agree.
"""

import dataclasses
import math
import os
import signal
import sys
import time

from configurator import SEED_RULE, ConfigError, configure, exit_on_signal_during_startup
exit_on_signal_during_startup('train.py')  # before the slow imports: a signal there is one line, not a traceback

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.distributed import destroy_process_group, init_process_group  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

from runtime import (MODEL_TYPES, CheckpointError, RunComplete, RuntimeSetupError, append_json_line,  # noqa: E402
                     autocast, check_data, check_memory, command_line, one_line_on_out_of_memory,
                     every_window, machine_name, missing_data_hint, model_module, model_settings, open_run_folder, peak_flops,
                     pick_device, pick_dtype, read_jsonl, read_resume_checkpoint, replica_checksums, rng_state, save_json,
                     save_torch, set_rng_state, setup_device, StopRequest, summarize, trim_metrics, val_halves)
import prepare_wiki  # noqa: E402

# -----------------------------------------------------------------------------
# default config values
# I/O
out_dir = 'out'  # checkpoints (ckpt.pt, best.pt), metrics.jsonl and config.json go here
eval_interval = 500  # evaluate (and checkpoint) every this many iterations
log_interval = 10  # log training statistics every this many iterations
eval_iters = 200  # batches per split in each evaluation (eval_windows='random')
eval_windows = 'random'  # 'random': eval_iters random batches (the seed's); 'all': the whole val split in non-overlapping windows
eval_halves = False  # also evaluate val's documents in two halves (alternate documents): val_select/, val_test/ records
eval_only = False  # evaluate once, then exit
always_save_checkpoint = True  # write ckpt.pt at every evaluation, not only when val improves
init_from = 'scratch'  # 'scratch' or 'resume' (from out_dir/ckpt.pt)
overwrite = False  # allow init_from='scratch' into an out_dir that already holds a run (deletes its files)
resume_anyway = False  # resume a ckpt.pt of another run (dataset, seed or run_id differ) or a best.pt (fresh optimizer)
# wandb logging
wandb_log = False  # off by default; when on, offline unless WANDB_MODE says otherwise
wandb_project = 'learned-dropout'  # wandb project name
wandb_run_name = None  # None: the config file's name
# data
data_dir = 'data'  # datasets prepared by prepare_wiki.py live in data_dir/dataset
dataset = 'wikipedia'  # a folder prepared by prepare_wiki.py: 'wikipedia', 'wiki_sample' or --name
gradient_accumulation_steps = 16  # micro-steps per optimizer step, summed over all DDP ranks
batch_size = 50  # micro-batch size per rank
# model (its settings are its GPTConfig's fields: --help lists them)
model_type = 'learned'  # 'learned' (model.py), 'baseline' (baseline_model.py) or 'moe' (moe_model.py)
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
compile = True  # torch.compile the model, as the seed runs did (a cold compile takes a while on a CPU)
seed = 1337  # model init, mask noise and batch order
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str, type(None)))]


def fail(message, code=1):
    """One line on stderr, then exit: for problems the user can fix."""
    print(f"train.py: error: {message}", file=sys.stderr)
    sys.exit(code)


# the model's settings are checked by its GPTConfig, where they are declared
RULES = {
    'model_type': f"x in {tuple(MODEL_TYPES)}", 'init_from': "x in ('scratch', 'resume')",
    'eval_windows': "x in ('random', 'all')",
    'dtype': "x in ('auto', 'float32', 'bfloat16', 'float16')", 'backend': "x in ('auto', 'nccl', 'gloo')",
    'eval_interval': 'x >= 1', 'log_interval': 'x >= 1', 'eval_iters': 'x >= 1', 'batch_size': 'x >= 1',
    'gradient_accumulation_steps': 'x >= 1', 'max_iters': 'x >= 0', 'warmup_iters': 'x >= 0',
    'lr_decay_iters': 'x >= 0', 'learning_rate': 'x > 0', 'min_lr': 'x >= 0', 'weight_decay': 'x >= 0',
    'beta1': '0 <= x < 1', 'beta2': '0 <= x < 1', 'grad_clip': ('x >= 0', '>= 0 (0: no clipping)'),
    'out_dir': ('len(x) > 0', 'a folder name'), 'dataset': ('len(x) > 0', 'a dataset name'), 'seed': SEED_RULE,
}
model_defaults, model_help = model_settings()
try:
    cli_args = sys.argv[1:]
    config = configure({**{k: globals()[k] for k in config_keys}, **model_defaults}, cli_args, __file__, __doc__,
                       RULES, model_help)
except ConfigError as e:
    fail(str(e), code=2)
globals().update(config)
if decay_lr and lr_decay_iters <= warmup_iters:
    fail(f"lr_decay_iters ({lr_decay_iters}) must be larger than warmup_iters ({warmup_iters}), or set decay_lr=False",
         code=2)
if decay_lr and 0 < max_iters < warmup_iters:  # the run would end before the learning rate reaches learning_rate
    fail(f"warmup_iters ({warmup_iters}) is above max_iters ({max_iters}): the learning rate would never reach "
         f"learning_rate; use --warmup_iters={max_iters} or less (or decay_lr=False)", code=2)
if decay_lr and min_lr > learning_rate:  # the "decay" would raise the learning rate, training up the loss
    fail(f"min_lr ({min_lr:g}) is above learning_rate ({learning_rate:g}): the schedule decays from learning_rate "
         f"to min_lr; lower min_lr (the seed's is a tenth of learning_rate)", code=2)
one_line_on_out_of_memory('train.py', "lower batch_size (raise gradient_accumulation_steps to keep the tokens per "
                                      "step), block_size or the model's size; checkpoints already written are intact")
GPTConfig, GPT = model_module(model_type).GPTConfig, model_module(model_type).GPT
try:  # checked here, before anything is written; vocab_size is the data's, set below
    gptconf = GPTConfig(**{f.name: config[f.name] for f in dataclasses.fields(GPTConfig) if f.name != 'vocab_size'})
except (ValueError, TypeError) as e:
    fail(f"bad model configuration: {e}", code=2)
own = {f.name for f in dataclasses.fields(GPTConfig)}
for k in sorted(set(model_defaults) - own):
    if config[k] != model_defaults[k]:
        print(f"warning: {k}={config[k]!r} is not a setting of the {model_type} model; it is ignored", file=sys.stderr)
wandb = None
if wandb_log:  # checked before the run folder is touched
    os.environ.setdefault('WANDB_MODE', 'offline')  # online needs a key and a network
    try:
        import wandb
    except ImportError:
        fail("wandb_log=True needs wandb: pip install wandb", code=2)
block_size = gptconf.block_size  # the context, and the length of the data windows
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
machine = machine_name(device)  # logged with each session's first step (a resumed run may go on elsewhere)
dtype = pick_dtype(dtype, device_type)
ctx = autocast(dtype, device_type)

# -----------------------------------------------------------------------------
# data: uniformly random windows of the memmapped token files

data_path = os.path.join(data_dir, dataset)
sample_args = prepare_wiki.sample_argv(dataset)
if sample_args and master_process and not os.path.exists(os.path.join(data_path, 'meta.json')):
    # the embedded sample is prepared on first use (offline, seconds): the quickstart is install, train, sample
    sample_args.append(f'--data_dir={data_dir}')
    print(f"preparing {data_path} first: python prepare_wiki.py {' '.join(sample_args)}", flush=True)
    prepare_wiki.main(sample_args)
if ddp:  # the other ranks read what rank 0 prepared
    torch.distributed.barrier()
try:
    meta = check_data(data_path, block_size, lambda: missing_data_hint(data_dir, dataset, cli_args, wandb_run_name))
    # val's documents split in two (early stopping chosen on one half, the result read on the other), in memory
    halves = val_halves(os.path.join(data_path, 'val.bin'), meta.get('eot_token'), block_size) if eval_halves else {}
except RuntimeSetupError as e:
    fail(str(e))
vocab_size = meta['vocab_size']
# data tokenized with GPT-2 cut to its first N ranks (reproduce.py's) says so; the checkpoints carry it
# so that sample.py and plot.py encode and decode text with that tokenizer (None: GPT-2's own)
tokenizer_cut = meta.get('tokenizer_cut')
gptconf = dataclasses.replace(gptconf, vocab_size=vocab_size)
model_args = dataclasses.asdict(gptconf)
try:  # before the model is built: a CPU run that cannot fit is otherwise killed by the kernel, without a word
    check_memory(model_type, model_args, batch_size, device, "lower batch_size (raise gradient_accumulation_steps "
                 "to keep the tokens per step), block_size or the model's size")
except RuntimeSetupError as e:
    fail(str(e), e.code)
batch_gen = torch.Generator().manual_seed(seed + ddp_rank)  # training windows, saved for exact resume
window = np.arange(block_size + 1)


def tokens(split):
    """A split's token ids: train.bin or val.bin (a new memmap each call: a long-lived one keeps growing
    in memory, a numpy issue), or one of val's halves."""
    return halves[split] if split in halves else np.memmap(os.path.join(data_path, f'{split}.bin'), dtype=np.uint16, mode='r')


def get_batch(split, generator):
    data = tokens(split)
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator).numpy()
    w = torch.from_numpy(data[ix[:, None] + window].astype(np.int64))  # (B, T+1)
    x, y = w[:, :-1], w[:, 1:]
    if device_type == 'cuda':
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


# -----------------------------------------------------------------------------
# model, run folder, optimizer, checkpoint

model = GPT(gptconf)  # built before the run folder is touched: a model that cannot be built deletes nothing
model.to(device)
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
metrics_path = os.path.join(out_dir, 'metrics.jsonl')
resume_cmd = ' '.join(['python train.py'] + [a for a in cli_args if not a.startswith('--init_from=')]
                      + ['--init_from=resume'])
if master_process:
    try:  # the lock is held until the process exits
        run_lock = open_run_folder(out_dir, init_from, overwrite)
    except RuntimeSetupError as e:
        fail(str(e), e.code)
checkpoint = None
if init_from == 'resume':
    try:
        checkpoint = read_resume_checkpoint(ckpt_path, model_type, model_args, max_iters, eval_only, cli_args, config,
                                            resume_anyway)
    except (CheckpointError, RuntimeSetupError) as e:
        fail(str(e), getattr(e, 'code', 1))
    except RunComplete as e:
        if master_process:
            print(e)
        sys.exit(0)
scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
iter_num, best_val_loss, evaluated_at = 0, float('inf'), -1
# best.pt is the evaluation with the lowest val loss; with eval_halves, the lowest val_select loss, so that
# val_test reads the chosen model without the choice's bias (early stopping on data the result does not use)
select_key = 'val_select/loss' if eval_halves else 'val/loss'
# the run's identity: a resumed run keeps its checkpoint's, so that another run's ckpt.pt is recognised
run_id = (checkpoint or {}).get('run_id') or os.urandom(8).hex()
if checkpoint is not None:
    model.load_state_dict(checkpoint['model'])
    if 'optimizer' in checkpoint:  # a best.pt has none: resume_anyway goes on with a fresh optimizer
        optimizer.load_state_dict(checkpoint['optimizer'])
        scaler.load_state_dict(checkpoint['scaler'])
    iter_num, best_val_loss, evaluated_at = checkpoint['iter_num'], checkpoint['best_val_loss'], checkpoint['evaluated_at']
    if len(checkpoint['rng']) == ddp_world_size:  # the random streams continue exactly
        set_rng_state(checkpoint['rng'][ddp_rank], batch_gen, device)
    else:
        print(f"warning: {ckpt_path} was written by {len(checkpoint['rng'])} process(es), this run has "
              f"{ddp_world_size}: random streams restart from the seed")
    checkpoint = None  # free the memory
raw_model = model
if compile:
    model = torch.compile(model)
train_model = DDP(model, device_ids=[ddp_local_rank] if device_type == 'cuda' else None) if ddp else model


def save_checkpoint(path, with_optimizer=True):
    """Written to a temporary name and renamed, so an interrupted save never clobbers a good file.
    Every rank must call it (the RNG states and weight checksums are gathered); rank 0 writes."""
    states, checksums = [rng_state(batch_gen, device)], [None]
    if ddp:
        states = [None] * ddp_world_size
        torch.distributed.all_gather_object(states, {k: v.cpu() for k, v in rng_state(batch_gen, device).items()})
        try:
            checksums = replica_checksums(raw_model, ddp_world_size)
        except RuntimeSetupError as e:
            fail(f"at iter {iter_num}: {e}")
    if not master_process:
        return
    ckpt = {'model': raw_model.state_dict(), 'model_type': model_type, 'model_args': model_args,
            'iter_num': iter_num, 'best_val_loss': best_val_loss, 'evaluated_at': evaluated_at,
            'config': config, 'rng': states, 'tokenizer_cut': tokenizer_cut, 'replica_checksums': checksums,
            'run_id': run_id}
    if with_optimizer:
        ckpt.update(optimizer=optimizer.state_dict(), scaler=scaler.state_dict())
    try:
        save_torch(ckpt, path)
    except RuntimeSetupError as e:
        fail(str(e))


@torch.no_grad()
def estimate_loss():
    """Pure cross-entropy (eval mode: deterministic masks, no dropout) on the same windows of each
    split every time (eval_iters random batches, or every window of the split), plus the model's
    eval-mode statistics; every window weighs the same."""
    out = {}
    model.eval()
    for split in ('train', 'val', *halves):
        if eval_windows == 'all':  # the train split capped at val's number of windows
            cap = (meta['val_tokens'] - 1) // block_size
            batches = ((x.to(device), y.to(device)) for x, y in every_window(tokens(split), block_size, batch_size, cap))
        else:
            gen = torch.Generator().manual_seed(seed + 1)  # fixed eval batches: comparable across evaluations
            batches = (get_batch(split, gen) for _ in range(eval_iters))
        sums, weight = {}, 0.0
        for X, Y in batches:
            with ctx:  # the loss alone, in chunks of tokens: no (B, T, vocab) logits
                _, _, stats = model(X, Y, return_stats=True, return_logits=False)
            w = len(X) / batch_size  # 1 but for a last, smaller batch of windows
            sums = {k: sums.get(k, 0) + v.float() * w for k, v in stats.items()}
            weight += w
        out.update(summarize({k: v / weight for k, v in sums.items()}, f'{split}/'))
    model.train()
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

if master_process and not eval_only:  # an evaluation only prints: the run's record stays as it was
    try:
        if init_from == 'resume' and os.path.exists(metrics_path):
            trim_metrics(metrics_path, iter_num, evaluated_at)
        save_json(dict(config, vocab_size=vocab_size, tokenizer_cut=tokenizer_cut, dtype=dtype, device=device,
                       world_size=ddp_world_size, tokens_per_iter=tokens_per_iter, num_params=raw_model.get_num_params(),
                       run_id=run_id),
                  os.path.join(out_dir, 'config.json'), 'config.json')
    except RuntimeSetupError as e:
        fail(str(e))
    if wandb is not None:
        wandb.init(project=wandb_project, name=wandb_run_name, config=dict(config, machine=machine, torch=torch.__version__))
if master_process:
    print(f"{model_type} model, {raw_model.get_num_params():,} parameters, {dtype} on {device}"
          f"{f' x {ddp_world_size} processes' if ddp else ''}, {tokens_per_iter:,} tokens per iteration")


def log(record):
    if not master_process or eval_only:
        return
    try:  # a full disk: the file keeps every whole line, the run stops with what to do
        append_json_line(record, metrics_path)
    except RuntimeSetupError as e:
        then = (f"free some space, then resume from the last checkpoint: {resume_cmd}" if os.path.exists(ckpt_path)
                else "free some space, then start the run again with --overwrite=True (it had no checkpoint yet)")
        fail(f"{e}; {then}")
    if wandb is not None:
        wandb.log({k: v for k, v in record.items() if k not in ('machine', 'torch')}, step=record['iter'])  # in its config


# -----------------------------------------------------------------------------
# stopping: SIGINT/SIGTERM finish the step, save and exit; a non-finite loss stops the run

stop = StopRequest()  # from here on a signal sets stop.signal; the loop saves and leaves at its next step


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
t_start = time.time()  # the end-of-run summary's time: compilation, training, evaluations, saves
t_log, iters_since_log, first_step, avg_dt = time.time(), 0, True, None
if compile and iter_num < max_iters and not eval_only and master_process:
    print("compiling the model: the first step takes a while", flush=True)
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
            extra = ''.join(f", val {k} {losses[f'val/{k}']:.4f}" for k in raw_model.console_stats
                            if k != 'ce' and f'val/{k}' in losses)
            halves_line = ''.join(f", {h.replace('_', ' ')} {losses[f'{h}/loss']:.4f}" for h in halves)
            print(f"step {iter_num}/{max_iters}: train loss {losses['train/loss']:.4f}, "
                  f"val loss {losses['val/loss']:.4f}{halves_line}{extra}")
            log({'iter': iter_num, **losses, 'lr': lr})
            improved = losses[select_key] < best_val_loss
            best_val_loss = min(best_val_loss, losses[select_key])
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
                if master_process:
                    print(f"saved {ckpt_path}" + (" and best.pt (best val so far)" if improved else ''), flush=True)
        t_log, iters_since_log = time.time(), 0  # step times exclude evaluation and saving
    if iter_num >= max_iters or eval_only:
        break

    # one optimizer step over gradient_accumulation_steps micro-batches; no host sync in here
    log_step = iter_num % log_interval == 0 or iter_num == max_iters - 1  # the last step too: charts cover the run
    stat_sums = {}
    loss_sum = torch.zeros((), device=device)
    for micro_step in range(gradient_accumulation_steps):
        if ddp:  # all-reduce the gradients only once, on the last micro-step
            train_model.require_backward_grad_sync = micro_step == gradient_accumulation_steps - 1
        X, Y = get_batch('train', batch_gen)
        with ctx:
            # the loss computed a chunk of tokens at a time: the (B, T, vocab) logits are never held whole
            _, loss, stats = train_model(X, Y, return_stats=True, return_logits=False)
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
        line += ''.join(f", {k} {record[k]:.4f}" for k in raw_model.console_stats if k in record)
        record['lr'] = lr
        line += f", lr {lr:.2e}"
        if first_step_s is not None:
            record.update(first_step_s=first_step_s, machine=machine, torch=torch.__version__)
            line += f", first step {first_step_s:.1f} s ({'compilation and ' if compile else ''}warm-up)"
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

    stopping = stop.signal is not None
    if ddp and log_step:  # agree on stopping only where the loop syncs anyway
        flag = torch.tensor(float(stopping), device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        stopping = bool(flag)
    elif ddp:
        stopping = False
    if stopping:
        check_finite(bad_iter)
        save_checkpoint(ckpt_path)
        if master_process:
            # iter = iterations done, as in the evaluations' "step N", the checkpoint and sample.py
            print(f"stopped by {stop.signal or 'a signal'} at iter {iter_num}/{max_iters}; saved {ckpt_path}. "
                  f"Resume with: {resume_cmd}")
        break
exit_code = 128 + signal.Signals[stop.signal].value if stop.signal else 0  # stopped early: not a finished run

if master_process and exit_code == 0 and not eval_only:  # how the run ended, and what to do with it
    try:
        evals = [r for r in read_jsonl(metrics_path) if isinstance(r, dict) and select_key in r]
    except (OSError, RuntimeSetupError):
        evals = []
    took, name = time.time() - t_start, select_key.split('/')[0].replace('_', ' ')
    line = f"done: {iter_num} iterations, {f'{int(took // 60)} min ' if took >= 60 else ''}{took % 60:.0f} s in this process"
    if evals:
        best = min(evals, key=lambda r: r[select_key])
        line += (f"; best {name} loss {best[select_key]:.4f} at iter {best['iter']}; final train loss "
                 f"{evals[-1]['train/loss']:.4f}, val loss {evals[-1]['val/loss']:.4f} (iter {evals[-1]['iter']})")
    if device_type == 'cuda':
        line += f"; peak GPU memory {torch.cuda.max_memory_allocated() / 2 ** 20:,.0f} MiB"
    else:  # this process's own peak (Linux reports KiB); torch.compile's worker processes are not in it
        import resource
        line += f"; peak memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB"
    print(line)
    best_path = os.path.join(out_dir, 'best.pt')  # none when no evaluation after step 0 improved on it
    print(f"checkpoints: {ckpt_path} (latest, resumable)" + (f", {best_path} (best {name})" if os.path.exists(best_path) else ''))
    longer = command_line('train.py', cli_args, ('max_iters', 'init_from', 'overwrite'), [f'--max_iters={2 * max_iters}',
                                                                             '--init_from=resume'])
    print(f"next: {command_line('sample.py', [f'--out_dir={out_dir}'])}\n      {command_line('plot.py', [out_dir])}\n"
          f"      {longer}   (train longer)")

if master_process and wandb is not None:
    wandb.finish()
if ddp:
    # every rank past its last collective before the group is torn down: a rank that tears down gloo while
    # the other is still saving can die with "terminate called without an active exception" (SIGABRT)
    torch.distributed.barrier()
    destroy_process_group()
sys.exit(exit_code)
