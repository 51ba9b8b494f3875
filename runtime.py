"""Shared machinery of the scripts: the model registry; device, precision and peak-FLOPs choices;
checkpoint loading; atomic writes, run-folder locks and metrics reading; and the checks train.py
runs before it trains (data, run folder, resume, DDP replicas), named for what they guard."""

import ctypes
import dataclasses
import errno
import importlib
import inspect
import json
import os
import re
import shutil
import socket
import sys
from contextlib import nullcontext

import numpy as np
import torch

PTDTYPE = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}
PEAK_FLOPS = {'A100': 312e12, 'H100': 989e12, 'H200': 989e12}  # dense bf16 tensor-core peaks


class RuntimeSetupError(Exception):
    """A device, file or folder problem the user can fix; the message is one line, code the exit code
    (2 for a mistaken request, as for a bad option; 1 otherwise)."""

    def __init__(self, message, code=1):
        super().__init__(message)
        self.code = code


# ----------------------------------------------------------------------------- models

MODEL_TYPES = {'learned': 'model', 'baseline': 'baseline_model', 'moe': 'moe_model'}  # model_type -> module


def model_module(model_type):
    """The module of a model_type: it defines GPTConfig (the model's settings) and GPT."""
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown model_type {model_type!r}; expected one of {', '.join(MODEL_TYPES)}")
    return importlib.import_module(MODEL_TYPES[model_type])


def model_settings():
    """Every model's settings as script options: ({name: default}, help entries). The GPTConfig fields
    of all model types (vocab_size, which the data sets, excepted), each with the comment written
    beside its declaration; entries are (heading, None) or (name, comment), as configurator's."""
    defaults, entries = {}, []
    for model_type in MODEL_TYPES:
        for cls in reversed(model_module(model_type).GPTConfig.__mro__):
            if not dataclasses.is_dataclass(cls):
                continue
            own = [f for f in dataclasses.fields(cls) if f.name not in defaults and f.name != 'vocab_size']
            if not own:
                continue
            entries.append((f"model ({cls.__module__}.py)", None))
            comments = field_comments(cls)
            for f in own:
                defaults[f.name] = f.default
                entries.append((f.name, comments.get(f.name, '')))
    return defaults, entries


def field_comments(cls):
    """{field: the comment beside its declaration} from a dataclass's source."""
    lines = inspect.getsource(cls).splitlines()
    found = (re.match(r'^\s+(\w+)\s*:[^=]*=.*?#\s*(.*)$', line) for line in lines)
    return {m[1]: m[2].strip() for m in found if m}


def available_devices():
    devs = ['cpu'] + [f'cuda:{i}' for i in range(torch.cuda.device_count())]
    return devs + (['mps'] if torch.backends.mps.is_available() else [])


def pick_device(device):
    """'auto' -> cuda > mps > cpu; anything else is checked to exist here and returned as given."""
    if device == 'auto':
        return 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'
    kind, _, index = device.partition(':')
    ok = (kind == 'cpu' and not index or kind == 'mps' and not index and torch.backends.mps.is_available()
          or kind == 'cuda' and torch.cuda.is_available() and (not index or index.isdigit()
                                                               and int(index) < torch.cuda.device_count()))
    if not ok:
        raise RuntimeSetupError(f"device {device!r} is not available here; available: "
                                f"{', '.join(['auto'] + available_devices())}")
    return device


def cpu_kind():
    """The CPU's model name and the flags that decide its speed here (AVX2, AVX-512, bf16, AMX), so that
    every figure carries its machine."""
    name, flags = 'unknown CPU', set()
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                key, _, value = line.partition(':')
                if key.strip() == 'model name' and name == 'unknown CPU':
                    name = value.strip()
                elif key.strip() == 'flags':
                    flags = set(value.split())
                    break
    except OSError:
        import platform
        name = platform.processor() or name
    shown = [f for f in ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16') if f in flags]
    return f"{name} ({' '.join(shown) or 'flags unknown'})"


def cpu_has_fast_bf16():
    """True on CPUs with bf16 matrix instructions (AVX512-BF16 or AMX), where bf16 autocast trains
    faster than float32 (BENCHMARK.md)."""
    probes = ('_is_avx512_bf16_supported', '_is_amx_tile_supported')
    return any(getattr(torch.cpu, p, lambda: False)() for p in probes)


def pick_dtype(dtype, device_type):
    """'auto' -> bfloat16 on CUDA where supported (float16 on older GPUs) and bf16 autocast on CPUs
    with fast bf16 instructions, float32 elsewhere: on such CPUs bf16 trained faster at every shape
    measured (BENCHMARK.md)."""
    if dtype != 'auto':
        return dtype
    if device_type == 'cuda':
        return 'bfloat16' if torch.cuda.is_bf16_supported() else 'float16'
    return 'bfloat16' if device_type == 'cpu' and cpu_has_fast_bf16() else 'float32'


def autocast(dtype, device_type):
    return nullcontext() if dtype == 'float32' else torch.autocast(device_type=device_type, dtype=PTDTYPE[dtype])


def peak_flops(device):
    """The GPU's bf16 peak in FLOP/s if it is a known one, else None (no MFU on CPU)."""
    if not str(device).startswith('cuda'):
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def setup_device(device_type):
    """Process-wide speed settings: TF32 on CUDA; on CPU, flush denormals (they make matmuls much
    slower in a badly initialised model) and keep freed memory in glibc's heap: otherwise each step's
    large buffers (the 50257-wide logits) go back to the OS and are page-faulted in again."""
    if device_type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif device_type == 'cpu':
        torch.set_flush_denormal(True)
        if sys.platform.startswith('linux'):
            try:
                libc = ctypes.CDLL('libc.so.6')
            except OSError:  # not glibc (e.g. musl): keep the defaults
                return
            M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
            libc.mallopt(M_MMAP_MAX, 0)
            libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1)
            libc.mallopt(M_TOP_PAD, 2 ** 29)


# ----------------------------------------------------------------------------- files

def tmp_name(path):
    """A temporary name beside path that no concurrent writer uses, even on another host sharing the
    folder (NAME.HOST.PID.tmp); clean_stale_tmp can tell from it whether its writer still runs."""
    return f'{path}.{socket.gethostname()}.{os.getpid()}.tmp'


def clean_stale_tmp(folder):
    """Remove the temporaries in folder (tmp_name's NAME.HOST.PID.tmp) of writers on this host that are
    gone (SIGKILL, a crash, power loss): nobody will rename or reuse them. Any other file, a user's own
    notes.tmp included, is left alone."""
    try:
        names = os.listdir(folder)
    except OSError:  # no folder yet, or not one: the caller reports what it cannot write
        return
    host = socket.gethostname()
    for name in names:
        m = re.fullmatch(r'(.+)\.(\d+)\.tmp', name)
        if m and m[1].endswith(f'.{host}') and len(m[1]) > len(host) + 1 and not pid_alive(int(m[2])):
            try:
                os.remove(os.path.join(folder, name))
            except OSError:
                pass


def pid_alive(pid):
    if os.name != 'posix':
        return True  # on Windows os.kill(pid, 0) would not probe but stop it: keep its files
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def atomic_write(path, write, what='file'):
    """write(tmp_path) then rename onto path, so an interrupted or failed write never clobbers a good
    file; a failure (a full disk included) becomes one RuntimeSetupError line and leaves no temporary."""
    tmp = tmp_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        folder = os.path.dirname(os.path.abspath(path))
        # torch.save reports a full disk as "[enforce fail at inline_container.cc] unexpected pos"
        full = getattr(e, 'errno', None) == errno.ENOSPC or shutil.disk_usage(folder).free < 2 ** 20
        reason = 'no space left on device' if full else (str(e).strip().splitlines() or [type(e).__name__])[0]
        kept = f"the previous {what} is intact" if os.path.exists(path) else f"no {what} was written"
        raise RuntimeSetupError(f"{reason} while writing {path}; {kept}") from None


def save_json(obj, path, what='file'):
    def write(tmp):
        with open(tmp, 'w') as f:
            json.dump(obj, f, indent=1)
    atomic_write(path, write, what)


def save_torch(obj, path, what='checkpoint'):
    atomic_write(path, lambda tmp: torch.save(obj, tmp), what)


def read_jsonl(path, warn=print):
    """The records of a JSON-lines file. A partial last line (a process killed mid-write) is skipped
    with a warning; a bad line elsewhere is an error."""
    with open(path) as f:
        lines = [line for line in f.read().split('\n') if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError:
            if i < len(lines) - 1:
                raise RuntimeSetupError(f"{path}: line {i + 1} is not valid JSON; fix or remove that line")
            warn(f"warning: skipped the incomplete last line of {path} (a process was stopped while writing it)")
    return records


class RunLock:
    """An exclusive lock on a run folder (out_dir/.lock, fcntl.flock) for the life of the process: a
    second run into the same folder is refused. The OS releases it if the process dies. A .lock that is
    a symbolic link is never followed (its target could be any file of the user's)."""

    def __init__(self, folder):
        import fcntl
        self.path = os.path.join(folder, '.lock')
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, 'O_NOFOLLOW', 0), 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise RuntimeSetupError(f"{self.path} is a symbolic link; remove it (a run folder's lock is a "
                                        f"plain file)") from None
            raise
        self.file = os.fdopen(fd, 'r+')
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = self.file.read().strip() or 'unknown'
            self.file.close()
            raise RuntimeSetupError(f"{folder} is in use by another run (pid {holder}); wait for it to finish, "
                                    f"stop it, or choose another out_dir") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(str(os.getpid()))
        self.file.flush()


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable or of an unknown model; the message is one line."""


def read_checkpoint(path):
    """The checkpoint dict written by train.py, on the CPU."""
    import os
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path}: train one first (python train.py config/quick_learned.py) "
                              f"or point out_dir at a run folder")
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {path} ({type(e).__name__}): the file is corrupt or incomplete; "
                              f"use another checkpoint (ckpt.pt or best.pt) or train again")
    if not isinstance(ckpt, dict) or 'model' not in ckpt:
        raise CheckpointError(f"{path} is not a checkpoint written by train.py")
    return ckpt


def load_model(path, device='cpu'):
    """(model in eval mode on device, checkpoint dict): the GPT of the checkpoint's model_type."""
    ckpt = read_checkpoint(path)
    model_type = ckpt.get('model_type')
    if model_type not in MODEL_TYPES:
        raise CheckpointError(f"{path} holds an unknown model_type {model_type!r}; "
                              f"expected one of {', '.join(map(repr, MODEL_TYPES))}")
    module = model_module(model_type)
    try:
        m = module.GPT(module.GPTConfig(**ckpt['model_args']))
        m.load_state_dict(ckpt['model'])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} does not fit a {model_type} GPT: {first}")
    return m.to(device).eval(), ckpt


# ----------------------------------------------------------------------------- train.py's guards

def missing_data_hint(data_dir, dataset, cli_args, run_name):
    """What to run when data_dir/dataset is not prepared: the preparation, and for the full Wikipedia
    (which needs the Hugging Face Hub) the offline way to try the same model on the embedded sample."""
    where = f" --data_dir={data_dir}" if data_dir != 'data' else ''
    if dataset == 'wiki_sample':
        return f"run 'python prepare_wiki.py --source=sample{where}'"
    if dataset != 'wikipedia':
        return f"run 'python prepare_wiki.py --source=files --files YOUR_FILES --name={dataset}{where}'"
    return (f"run 'python prepare_wiki.py --max_tokens=42600000{where}' (streams Wikipedia from the Hugging Face Hub); "
            f"offline, try this model on the embedded sample: 'python prepare_wiki.py --source=sample{where}' then "
            f"'python train.py {' '.join(a for a in cli_args if not a.startswith('--dataset='))} --dataset=wiki_sample "
            f"--out_dir=out/try_{run_name} --batch_size=8 --gradient_accumulation_steps=1 --max_iters=200 "
            f"--eval_interval=50 --eval_iters=10 --compile=False'")


def every_window(data, block_size, batch_size, cap=None):
    """(x, y) batches of up to batch_size of the non-overlapping windows of data (token ids: an array, or
    the path of a uint16 token file), in order (a last partial one is left out); with more than cap
    windows, cap of them spread evenly over the data."""
    if isinstance(data, str):
        data = np.memmap(data, dtype=np.uint16, mode='r')
    starts = np.arange((len(data) - 1) // block_size) * block_size
    if cap is not None and len(starts) > cap:
        starts = starts[np.linspace(0, len(starts) - 1, cap).round().astype(np.int64)]
    window = np.arange(block_size + 1)
    for i in range(0, len(starts), batch_size):
        w = torch.from_numpy(data[starts[i:i + batch_size, None] + window].astype(np.int64))  # (B, T+1)
        yield w[:, :-1], w[:, 1:]


def val_halves(path, eot, block_size):
    """{'val_select': ids, 'val_test': ids}: the documents of the token file at path (each ends with the
    token eot) dealt alternately into two halves, so that neither half follows the file's order. One half
    chooses a run's best evaluation (early stopping), the other reports it without that choice's bias."""
    if eot is None:
        raise RuntimeSetupError(f"{os.path.dirname(path)}/meta.json has no eot_token: eval_halves needs the document "
                                f"boundaries; prepare the data again with prepare_wiki.py --force")
    data = np.fromfile(path, dtype=np.uint16)
    ends = np.flatnonzero(data == eot) + 1  # one past each document's end-of-text
    docs = np.split(data, ends[:-1] if len(ends) and ends[-1] == len(data) else ends)
    halves = {'val_select': np.concatenate(docs[0::2]), 'val_test': np.concatenate(docs[1::2] or [data[:0]])}
    for name, ids in halves.items():
        if len(ids) <= block_size:
            raise RuntimeSetupError(f"{path}: its half {name} has {len(ids)} tokens ({len(docs)} documents in all), too "
                                    f"few for block_size={block_size}; use eval_halves=False or more val data")
    return halves


def check_data(data_path, block_size, hint):
    """The prepared data at data_path, checked whole before any training: meta.json readable, the
    token files as long as it says and longer than a window, every id inside the vocabulary.
    Returns meta.json's dict; hint() says what to run when nothing is prepared there."""
    if not all(os.path.exists(os.path.join(data_path, f)) for f in ('train.bin', 'val.bin', 'meta.json')):
        raise RuntimeSetupError(f"no prepared data in {data_path}: {hint()}")
    redo = "run prepare_wiki.py again with --force"
    try:
        with open(os.path.join(data_path, 'meta.json')) as f:
            meta = json.load(f)
        meta['vocab_size'] = int(meta['vocab_size'])
        for split in ('train', 'val'):
            meta[f'{split}_tokens'] = int(meta[f'{split}_tokens'])
    except (OSError, ValueError, TypeError, KeyError) as e:
        what = f"has no {e}" if isinstance(e, KeyError) else f"cannot be read ({type(e).__name__})"
        raise RuntimeSetupError(f"{data_path}/meta.json {what}: the preparation is incomplete or damaged; {redo}")
    for split in ('train', 'val'):
        path = os.path.join(data_path, f'{split}.bin')
        n_tokens = os.path.getsize(path) // 2
        if n_tokens != meta[f'{split}_tokens']:
            raise RuntimeSetupError(f"{path} has {n_tokens} tokens but meta.json says {meta[f'{split}_tokens']}: "
                                    f"the preparation is incomplete; {redo}")
        if n_tokens <= block_size:
            raise RuntimeSetupError(f"{path} has {n_tokens} tokens, too few for block_size={block_size}; "
                                    f"use a smaller block_size or more data")
        # one vectorised pass: an id outside the vocabulary would fail deep inside the embedding much later
        top = int(np.memmap(path, dtype=np.uint16, mode='r').max())
        if top >= meta['vocab_size']:
            raise RuntimeSetupError(f"{path} holds token id {top} but meta.json's vocab_size is {meta['vocab_size']}: "
                                    f"the data and its meta.json do not belong together; {redo}")
    return meta


RUN_FILES = ('ckpt.pt', 'best.pt', 'metrics.jsonl')  # what a run writes that a new run must not lose


def open_run_folder(out_dir, init_from, overwrite):
    """Lock out_dir for this process (a second run into it is refused), remove the temporaries of a
    killed run, and refuse to train from scratch over an earlier run unless overwrite (then delete
    its files). Returns the lock, to be held until the process exits. Call only once the whole
    configuration has been checked: nothing may be deleted for a run that cannot start."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        lock = RunLock(out_dir)
    except OSError as e:
        raise RuntimeSetupError(f"cannot write to out_dir {out_dir}: {e.strerror or e}") from None
    clean_stale_tmp(out_dir)
    earlier = [f for f in RUN_FILES if os.path.exists(os.path.join(out_dir, f))]
    if init_from == 'scratch' and earlier:
        if not overwrite:
            raise RuntimeSetupError(
                f"{out_dir} already holds a run ({', '.join(earlier)}); continue it with --init_from=resume, "
                f"train into another --out_dir, or start it over with --overwrite=True (deletes those files)", code=2)
        for f in earlier:
            os.remove(os.path.join(out_dir, f))
    return lock


class RunComplete(Exception):
    """The run to resume has reached max_iters; the message says how to extend it."""


def read_resume_checkpoint(path, model_type, model_args, max_iters, eval_only, cli_args):
    """The checkpoint to resume from, checked to hold the same model; RunComplete if it is finished."""
    checkpoint = read_checkpoint(path)
    check_resume(checkpoint, path, model_type, model_args)
    if checkpoint['iter_num'] >= max_iters and not eval_only:
        longer = ' '.join(['python train.py'] + [a for a in cli_args if not a.startswith('--max_iters=')]
                          + [f"--max_iters={2 * checkpoint['iter_num']}"])
        raise RunComplete(f"{os.path.dirname(path) or '.'}: the run is complete ({checkpoint['iter_num']} of "
                          f"max_iters={max_iters} iterations); to train it longer, resume with a larger max_iters: "
                          f"{longer}")
    return checkpoint


def check_resume(checkpoint, path, model_type, model_args):
    """Refuse to resume a checkpoint into a different model: the same model_type and settings."""
    if checkpoint.get('model_type') != model_type:
        raise RuntimeSetupError(f"{path} holds a {checkpoint.get('model_type')!r} model but model_type={model_type!r}: "
                                f"resume with the config the run was started with")
    for k, v in checkpoint['model_args'].items():
        if model_args.get(k) != v:
            raise RuntimeSetupError(f"{path} was trained with {k}={v!r} but this run has {k}={model_args.get(k)!r}: "
                                    f"resume with the config the run was started with")


def rng_state(batch_gen, device):
    """This process's random streams: the model's noise (masks, dropout) and the batch sampler's."""
    state = {'torch': torch.get_rng_state(), 'batch': batch_gen.get_state()}
    if str(device).startswith('cuda'):
        state['cuda'] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, batch_gen, device):
    """Continue the random streams that rng_state saved."""
    torch.set_rng_state(state['torch'])
    batch_gen.set_state(state['batch'])
    if str(device).startswith('cuda'):
        torch.cuda.set_rng_state(state['cuda'], device)


class StopRequest:
    """From its creation, SIGINT and SIGTERM only set .signal (the name of the last one): a training loop
    looks at it between steps, saves and leaves."""

    def __init__(self):
        import signal
        self.signal = None
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self.request)

    def request(self, signum, frame):
        import signal
        self.signal = signal.Signals(signum).name


def replica_checksums(model, world_size):
    """Every DDP rank's weight checksum, gathered (all ranks must call it). Replicas must hold identical
    weights (all-reduced gradients, same optimizer): checked at every save, where the loop syncs anyway,
    rather than save one replica of a silently split model."""
    checksum = sum(p.detach().double().square().sum().item() for p in model.parameters())
    checksums = [None] * world_size
    torch.distributed.all_gather_object(checksums, checksum)
    if len(set(checksums)) != 1:
        raise RuntimeSetupError(f"the DDP replicas' weights differ (checksums {checksums}); gradients are not "
                                f"being all-reduced")
    return checksums


def trim_metrics(path, iter_num, evaluated_at):
    """On resume, drop what the interrupted run logged after its checkpoint: it is about to be redone.
    Training records carry the iteration that ran; evaluations the iteration before which they ran."""
    records = read_jsonl(path)
    kept = [r for r in records if r['iter'] < iter_num or (r['iter'] == evaluated_at == iter_num and 'val/loss' in r)]
    save_json_lines(kept, path)


def save_json_lines(records, path):
    def write(tmp):
        with open(tmp, 'w') as f:
            f.writelines(json.dumps(r) + '\n' for r in records)
    atomic_write(path, write, 'metrics file')


def summarize(stats, prefix=''):
    """A log record from a model's stats (forward(..., return_stats=True)), whatever they are: a scalar
    as itself; a tensor whose first dimension is the layer as its mean over layers, and the per-layer
    values as NAME_per_layer. 'ce' is named 'loss' in evaluations. Syncs (tolist)."""
    out = {}
    for k, v in stats.items():
        name = 'loss' if k == 'ce' and prefix else k
        v = v.float()
        out[prefix + name] = v.mean(0).tolist() if v.dim() else v.item()
        if v.dim():
            out[f'{prefix}{name}_per_layer'] = v.tolist()
    return out
