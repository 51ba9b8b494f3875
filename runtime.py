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

from tokenizer import EOT, vocab_size_of

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


def machine_name(device):
    """What a figure measured on device ran on: the GPU's name, or the CPU kind and torch's thread count."""
    device_type = str(device).split(':')[0]
    if device_type == 'cuda':
        return torch.cuda.get_device_name(device)
    if device_type == 'cpu':
        n = torch.get_num_threads()
        return f"{cpu_kind()}, {n} thread{'s' * (n != 1)}"
    return str(device)


def cpu_has_fast_bf16():
    """True on CPUs with bf16 matrix instructions (AVX512-BF16 or AMX), where bf16 autocast trains
    faster than float32 (BENCHMARK.md)."""
    probes = ('_is_avx512_bf16_supported', '_is_amx_tile_supported')
    return any(getattr(torch.cpu, p, lambda: False)() for p in probes)


def pick_dtype(dtype, device_type):
    """'auto' -> bfloat16 on CUDA where supported (float16 on older GPUs) and bf16 autocast on CPUs
    with fast bf16 instructions, float32 elsewhere: on such CPUs bf16 trained faster at every shape
    measured (BENCHMARK.md). An explicit bfloat16 on a CPU without them works, emulated: one warning line."""
    if dtype == 'bfloat16' and device_type == 'cpu' and not cpu_has_fast_bf16():
        print(f"warning: dtype='bfloat16' on a CPU without bf16 instructions ({cpu_kind()}) is emulated and slower "
              f"than float32, which dtype='auto' picks here", file=sys.stderr)
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


# ----------------------------------------------------------------------------- memory

def training_memory(model_type, model_args, batch_size):
    """Bytes one training step of this model at this micro-batch needs at least, in float32: the weights,
    their gradients and AdamW's two moments (16 bytes a parameter), one chunk of logits and its gradient
    (train.py's loss is baseline_model.chunked_cross_entropy), the final hidden state's gradient, and
    every layer's activations kept for backward (Korthikanti et al. 2022: 34·C bytes a token at 16 bits,
    doubled; the attention matrices left out, as fused attention keeps none). A lower bound, so that no
    run that fits is refused: measured steps of the seed and other shapes took 1.2-1.5 times as much.
    An evaluation needs less. The model is built on the meta device: counting its parameters allocates
    nothing."""
    module = model_module(model_type)
    cfg = module.GPTConfig(**model_args)
    with torch.device('meta'):
        n_params = sum(p.numel() for p in module.GPT(cfg).parameters())
    from baseline_model import ce_chunk_tokens
    tokens = batch_size * cfg.block_size
    logits = 8 * min(tokens, ce_chunk_tokens(cfg.vocab_size)) * cfg.vocab_size
    return 16 * n_params + logits + tokens * (4 * cfg.n_embd + cfg.n_layer * 68 * cfg.n_embd)


def available_memory(device):
    """Bytes the device can still give this process: a GPU's free memory, else the system's available
    memory (Linux's MemAvailable: free plus reclaimable caches); None where unknown."""
    if str(device).startswith('cuda'):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open('/proc/meminfo') as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith('MemAvailable:'))
    except (OSError, ValueError, IndexError, StopIteration):
        try:
            return os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
        except (OSError, ValueError, AttributeError):
            return None


def check_memory(model_type, model_args, batch_size, device, advice):
    """Refuse, before anything is allocated, a run whose training step cannot fit in the device's memory:
    on a CPU the kernel would otherwise kill the process (which nothing can catch) or swap for hours."""
    need, have = training_memory(model_type, model_args, batch_size), available_memory(device)
    if have is not None and need > have:
        raise RuntimeSetupError(f"a training step of this model at batch_size={batch_size} needs at least about "
                                f"{need / 1e9:,.1f} GB of memory, and {device} has {have / 1e9:,.1f} GB available; "
                                f"{advice}", code=2)


def is_out_of_memory(e):
    """True for an allocator's failure: torch.OutOfMemoryError (a GPU), the CPU allocator's RuntimeError
    ("not enough memory"), MemoryError (numpy, Python), also as the cause of another error."""
    while e is not None:
        if isinstance(e, (MemoryError, torch.OutOfMemoryError)) or isinstance(e, RuntimeError) and re.search(
                r"not enough memory|out of memory|can't allocate memory", str(e), re.IGNORECASE):
            return True
        e = e.__cause__ or e.__context__
    return False


def one_line_on_out_of_memory(script, advice):
    """From here on, an allocation that fails anywhere in the script ends it with one line and exit code 1
    instead of a traceback (check_memory refuses the clear cases up front; this catches the rest, e.g. a
    GPU shared with another process). Any other error keeps its traceback."""
    previous = sys.excepthook

    def hook(kind, value, tb):
        if not is_out_of_memory(value):
            return previous(kind, value, tb)
        first = (str(value).strip().splitlines() or [kind.__name__])[0]
        print(f"{script}: error: out of memory ({first}); {advice}", file=sys.stderr, flush=True)
    sys.excepthook = hook


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
    """An exclusive lock on a run folder (out_dir/.lock, fcntl.flock; prepare_wiki.py locks its data folder
    the same way) for the life of the process: a second run into the same folder is refused. The OS releases it if the process dies. A .lock that is
    a symbolic link is never followed (its target could be any file of the user's)."""

    def __init__(self, folder, advice="wait for it to finish, stop it, or choose another out_dir"):
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
            raise RuntimeSetupError(f"{folder} is in use by another run (pid {holder}); {advice}") from None
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
    import pickle
    import warnings
    try:
        with warnings.catch_warnings():  # torch warns in two lines about a pickle protocol it will refuse anyway
            warnings.simplefilter('ignore')
            ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's safe loader met a pickle that would import something (e.g. os.system), or bytes that are
        # no pickle at all (an unsupported opcode): the first is refused as unsafe, the second is corrupt
        why = next((line.strip() for line in str(e).splitlines() if 'GLOBAL' in line), '')
        if not why:
            raise CheckpointError(f"cannot read {path} (not a torch checkpoint): the file is corrupt or incomplete; "
                                  f"use another checkpoint (ckpt.pt or best.pt) or train again") from None
        raise CheckpointError(f"{path} was refused as unsafe: it is not a plain checkpoint of tensors and numbers "
                              f"({why}) and loading it could run code; use a checkpoint "
                              f"train.py wrote (ckpt.pt or best.pt)") from None
    except Exception as e:
        raise CheckpointError(f"cannot read {path} ({type(e).__name__}): the file is corrupt or incomplete; "
                              f"use another checkpoint (ckpt.pt or best.pt) or train again")
    if not isinstance(ckpt, dict):
        what = f"it holds a {type(ckpt).__name__}"
    else:
        missing = [k for k in ('model', 'model_type', 'model_args') if k not in ckpt]
        what = (f"it has no {', '.join(missing)}" if missing else None if isinstance(ckpt['model_args'], dict)
                else "its model_args is not a dict")
    if what:
        raise CheckpointError(f"{path} is not a checkpoint written by train.py ({what}); use a run folder's "
                              f"ckpt.pt or best.pt")
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

def command_line(script, cli_args, drop=(), add=()):
    """'python SCRIPT ARGS' to print as advice: the user's arguments as given, less the settings named in drop
    (in either form, --key=value or --key value, as configurator reads them), plus the --key=value in add."""
    import shlex
    kept, i = [], 0
    while i < len(cli_args):
        arg = cli_args[i]
        key = arg[2:].partition('=')[0] if arg.startswith('--') else None
        n = 2 if key and '=' not in arg and i + 1 < len(cli_args) and not cli_args[i + 1].startswith('--') else 1
        if key not in drop:
            kept += cli_args[i:i + n]
        i += n
    return shlex.join(['python', script, *kept, *add])


def given_settings(cli_args):
    """The settings the command line sets (--key=value or --key value)."""
    return {a[2:].partition('=')[0] for a in cli_args if a.startswith('--')}


# the offline try of a seed config (README, "Trying a seed config on a CPU"): short, but past the warm-up,
# so that the learning rate peaks and the masks visibly move (keep falls from 1.0 within about 100 steps)
TRY_SETTINGS = {'batch_size': 4, 'gradient_accumulation_steps': 1, 'max_iters': 100, 'warmup_iters': 10,
                'eval_interval': 25, 'eval_iters': 5, 'log_interval': 10, 'compile': False}


def missing_data_hint(data_dir, dataset, cli_args, run_name):
    """What to run when data_dir/dataset is not prepared (train.py prepares the embedded sample itself):
    the preparation, and for the full Wikipedia (which needs the Hugging Face Hub) the offline try of the
    same model on the embedded sample: the user's arguments as given (an explicit --compile=True stays),
    TRY_SETTINGS for every setting they did not give, in its own out_dir."""
    where = f" --data_dir={data_dir}" if data_dir != 'data' else ''
    if dataset != 'wikipedia':
        return f"run 'python prepare_wiki.py --source=files --files YOUR_FILES --name={dataset}{where}'"
    given = given_settings(cli_args)
    extra = [f'--{k}={v}' for k, v in {'out_dir': f'out/try_{run_name}', **TRY_SETTINGS}.items() if k not in given]
    try_cmd = command_line('train.py', cli_args, drop=('dataset',), add=['--dataset=wiki_sample', *extra])
    return (f"run 'python prepare_wiki.py --max_tokens=42600000{where}' (streams Wikipedia from the Hugging Face Hub); "
            f"offline, try this model on the embedded sample for a few minutes (README, \"Trying a seed config on a "
            f"CPU\"): {try_cmd}")


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
    missing = False
    for name in ('train.bin', 'val.bin', 'meta.json'):
        try:  # a file that is there but cannot be read is not "no prepared data": say which and why
            with open(os.path.join(data_path, name), 'rb'):
                pass
        except FileNotFoundError:
            missing = True
        except OSError as e:
            raise RuntimeSetupError(f"cannot read {os.path.join(data_path, name)}: {e.strerror or e}; it must be a "
                                    f"readable file (check its permissions)") from None
    if missing:
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
        size = os.path.getsize(path)
        if size % 2:
            raise RuntimeSetupError(f"{path} has an odd number of bytes ({size}) but holds 2-byte (uint16) tokens: it "
                                    f"is truncated or not a token file; {redo}")
        n_tokens = size // 2
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
    # the tokenizer sample.py and plot.py will decode with: GPT-2's, or its cut to tokenizer_cut ranks
    cut = meta.get('tokenizer_cut')
    if cut is not None and (type(cut) is not int or not 256 <= cut <= EOT):
        raise RuntimeSetupError(f"{data_path}/meta.json's tokenizer_cut must be an integer in [256, {EOT}] (the GPT-2 "
                                f"ranks the data was cut to) or absent, got {cut!r}; {redo}")
    vocab = vocab_size_of(cut)
    if meta['vocab_size'] != vocab:
        what = "GPT-2's" if cut is None else f"GPT-2 cut to {cut} ranks + <|endoftext|>"
        raise RuntimeSetupError(f"{data_path}/meta.json says vocab_size={meta['vocab_size']} but its tokenizer ({what}) "
                                f"has {vocab} ids: a model of that vocabulary could not be sampled or decoded; set "
                                f"vocab_size to {vocab} in meta.json, or {redo}")
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
    earlier = [f for f in RUN_FILES if os.path.lexists(os.path.join(out_dir, f))]
    odd = [f for f in earlier if os.path.islink(os.path.join(out_dir, f)) or not os.path.isfile(os.path.join(out_dir, f))]
    if odd:  # e.g. a directory named metrics.jsonl: a run could not append to, trim or replace it
        raise RuntimeSetupError(f"{os.path.join(out_dir, odd[0])} is not a plain file (a directory or a link) where a "
                                f"run keeps its {odd[0]}; move it away or choose another out_dir")
    if init_from == 'scratch' and earlier:
        if not overwrite and 'ckpt.pt' not in earlier:  # resuming cannot help: say the one thing that works
            raise RuntimeSetupError(
                f"{out_dir} holds a run that was stopped before its first checkpoint ({', '.join(earlier)}, no "
                f"ckpt.pt), so there is nothing to resume; start it over with --overwrite=True (deletes those "
                f"files) or train into another --out_dir", code=2)
        if not overwrite:
            raise RuntimeSetupError(
                f"{out_dir} already holds a run ({', '.join(earlier)}); continue it with --init_from=resume, "
                f"train into another --out_dir, or start it over with --overwrite=True (deletes those files)", code=2)
        for f in earlier:
            os.remove(os.path.join(out_dir, f))
    return lock


class RunComplete(Exception):
    """The run to resume has reached max_iters; the message says how to extend it."""


RUN_IDENTITY = ('dataset', 'seed')  # settings a resumed run must share with its checkpoint, besides the model's


def read_resume_checkpoint(path, model_type, model_args, max_iters, eval_only, cli_args, config, anyway=False):
    """The checkpoint to resume from, checked to be this run's: a whole train.py checkpoint, of the same
    model, dataset and seed, and of the run whose config.json is in its folder (unless anyway: a
    documented choice to go on from another run's weights, or from a best.pt with a fresh optimizer).
    RunComplete if it is finished."""
    folder = os.path.dirname(path) or '.'
    if not os.path.exists(path) and any(os.path.exists(os.path.join(folder, f)) for f in RUN_FILES):
        raise RuntimeSetupError(f"{folder} holds a run that was stopped before its first checkpoint (no ckpt.pt), so "
                                f"there is nothing to resume; start it over with: "
                                f"{command_line('train.py', cli_args, ['init_from', 'overwrite'], ['--overwrite=True'])}", code=2)
    checkpoint = read_checkpoint(path)
    missing = [k for k in ('iter_num', 'best_val_loss', 'evaluated_at', 'rng') if k not in checkpoint]
    if missing:
        raise CheckpointError(f"{path} cannot be resumed: it has no {', '.join(missing)} (not a checkpoint of this "
                              f"train.py); train the run again")
    anyway_cmd = command_line('train.py', cli_args, ['resume_anyway'], ['--resume_anyway=True'])
    if not anyway and not all(k in checkpoint for k in ('optimizer', 'scaler')):
        raise RuntimeSetupError(f"{path} holds no optimizer state (as a best.pt, which keeps the model only), so "
                                f"the run cannot continue exactly; put the run's own ckpt.pt back, or go on from these "
                                f"weights with a fresh optimizer: {anyway_cmd}", code=2)
    theirs = checkpoint.get('config') or {}
    for k in RUN_IDENTITY:
        if not anyway and k in theirs and theirs[k] != config[k]:
            raise RuntimeSetupError(f"{path} was trained with {k}={theirs[k]!r} but this run has {k}={config[k]!r}: "
                                    f"resume with the settings the run was started with, or mix the two in one run "
                                    f"anyway: {anyway_cmd}", code=2)
    try:  # the folder's own run, as config.json names it (absent or unreadable: nothing to compare)
        with open(os.path.join(folder, 'config.json')) as f:
            folder_id = json.load(f).get('run_id')
    except (OSError, ValueError, AttributeError):
        folder_id = None
    if not anyway and folder_id and checkpoint.get('run_id') and folder_id != checkpoint['run_id']:
        raise RuntimeSetupError(f"{path} belongs to another run (run_id {checkpoint['run_id']}) than {folder}/config.json "
                                f"(run_id {folder_id}): it was copied here from another run folder; put this run's "
                                f"ckpt.pt back, or continue the other run here anyway: {anyway_cmd}", code=2)
    check_resume(checkpoint, path, model_type, model_args)
    if checkpoint['iter_num'] >= max_iters and not eval_only:
        longer = command_line('train.py', cli_args, ['max_iters'], [f"--max_iters={2 * checkpoint['iter_num']}"])
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


def trim_metrics(path, iter_num, evaluated_at, warn=print):
    """On resume, drop what the interrupted run logged after its checkpoint: it is about to be redone.
    Training records carry the iteration that ran; evaluations the iteration before which they ran.
    Lines that are not records (an edited file: {}, null) are left out with a warning."""
    records = read_jsonl(path, warn)
    good = [r for r in records if isinstance(r, dict) and type(r.get('iter')) is int]
    if len(good) < len(records):
        warn(f"warning: {path}: left out {len(records) - len(good)} line(s) that are not training records "
             f"(records are objects with an 'iter')")
    kept = [r for r in good if r['iter'] < iter_num or (r['iter'] == evaluated_at == iter_num and 'val/loss' in r)]
    save_json_lines(kept, path)


def append_json_line(record, path):
    """Append one JSON line to path (metrics.jsonl). A write that fails (a full disk) is undone, so the file
    never ends in a torn line, and becomes one RuntimeSetupError line; the lines before it are kept."""
    data = (json.dumps(record) + '\n').encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, 'O_NOFOLLOW', 0), 0o644)
    except OSError as e:
        raise RuntimeSetupError(f"cannot append to {path}: {e.strerror or e}") from None
    try:
        size = os.fstat(fd).st_size
        try:
            while data:
                data = data[os.write(fd, data):]
        except OSError as e:
            os.ftruncate(fd, size)
            reason = 'no space left on device' if e.errno == errno.ENOSPC else e.strerror or str(e)
            raise RuntimeSetupError(f"{reason} while appending to {path}; its earlier lines are intact") from None
    finally:
        os.close(fd)


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
