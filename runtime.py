"""Device, precision and peak-FLOPs choices shared by train.py, sample.py and bench.py."""

import ctypes
import sys
from contextlib import nullcontext

import torch

PTDTYPE = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}
PEAK_FLOPS = {'A100': 312e12, 'H100': 989e12, 'H200': 989e12}  # dense bf16 tensor-core peaks


def pick_device(device):
    """'auto' -> cuda > mps > cpu; anything else is returned as given."""
    if device != 'auto':
        return device
    return 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'


def pick_dtype(dtype, device_type):
    """'auto' -> bfloat16 on CUDA where supported, float16 on older CUDA, float32 elsewhere."""
    if dtype != 'auto':
        return dtype
    if device_type == 'cuda':
        return 'bfloat16' if torch.cuda.is_bf16_supported() else 'float16'
    return 'float32'


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
    """(model in eval mode on device, checkpoint dict): a model.GPT or baseline_model.GPT as the
    checkpoint's model_type says."""
    ckpt = read_checkpoint(path)
    model_type = ckpt.get('model_type')
    if model_type == 'learned':
        import model as module
    elif model_type == 'baseline':
        import baseline_model as module
    else:
        raise CheckpointError(f"{path} holds an unknown model_type {model_type!r}; expected 'learned' or 'baseline'")
    try:
        m = module.GPT(module.GPTConfig(**ckpt['model_args']))
        m.load_state_dict(ckpt['model'])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} does not fit a {model_type} GPT: {first}")
    return m.to(device).eval(), ckpt
