"""Shared machinery of the scripts: device, precision and peak-FLOPs choices; checkpoint loading;
atomic writes, run-folder locks and metrics reading."""

import ctypes
import errno
import json
import os
import re
import shutil
import socket
import sys
from contextlib import nullcontext

import torch

PTDTYPE = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}
PEAK_FLOPS = {'A100': 312e12, 'H100': 989e12, 'H200': 989e12}  # dense bf16 tensor-core peaks


class RuntimeSetupError(Exception):
    """A device, file or folder problem the user can fix; the message is one line."""


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


def cpu_has_fast_bf16():
    """True on CPUs with bf16 matrix instructions (AVX512-BF16 or AMX), where bf16 autocast trains
    faster than float32 (measured: README, Benchmark)."""
    probes = ('_is_avx512_bf16_supported', '_is_amx_tile_supported')
    return any(getattr(torch.cpu, p, lambda: False)() for p in probes)


def pick_dtype(dtype, device_type):
    """'auto' -> bfloat16 on CUDA where supported (float16 on older GPUs) and bf16 autocast on CPUs
    with fast bf16 instructions, float32 elsewhere. Measured on such a CPU (README, Benchmark), compiled:
    bf16 made the training step 1.3-1.8x faster at every shape tried, from 4 layers x 48 with 2,048
    words to the seed's 26 layers x 144 with 50,257."""
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
    """Process-wide speed settings: TF32 on CUDA; on CPU, flush denormals (they made matmuls
    ~10x slower in a badly initialised model) and keep freed memory in glibc's heap. Without the
    latter, each step's large buffers (the 50257-wide logits) go back to the OS and are page-faulted
    in again: a 1.24x slower training step here."""
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
    """Remove the temporaries in folder of writers on this host that are gone (SIGKILL, a crash, power
    loss), and NAME.tmp files of older versions: nobody will rename or reuse them."""
    try:
        names = os.listdir(folder)
    except OSError:  # no folder yet, or not one: the caller reports what it cannot write
        return
    host = socket.gethostname()
    for name in names:
        m = re.fullmatch(r'(.+?)(?:\.([^.]+)\.(\d+))?\.tmp', name)
        if m and (m[2] is None or m[2] == host and not pid_alive(int(m[3]))):
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
    second run into the same folder is refused. The OS releases it if the process dies."""

    def __init__(self, folder):
        import fcntl
        self.path = os.path.join(folder, '.lock')
        self.file = open(self.path, 'a+')
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
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
    """(model in eval mode on device, checkpoint dict): a model.GPT, baseline_model.GPT or
    moe_model.GPT as the checkpoint's model_type says."""
    ckpt = read_checkpoint(path)
    model_type = ckpt.get('model_type')
    if model_type == 'learned':
        import model as module
    elif model_type == 'baseline':
        import baseline_model as module
    elif model_type == 'moe':
        import moe_model as module
    else:
        raise CheckpointError(f"{path} holds an unknown model_type {model_type!r}; "
                              f"expected 'learned', 'baseline' or 'moe'")
    try:
        m = module.GPT(module.GPTConfig(**ckpt['model_args']))
        m.load_state_dict(ckpt['model'])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} does not fit a {model_type} GPT: {first}")
    return m.to(device).eval(), ckpt
