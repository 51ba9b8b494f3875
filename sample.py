"""
Sample text from a checkpoint of either model (the model_type stored in it decides).

$ python sample.py --out_dir=out/quick_learned
$ python sample.py --out_dir=out/learned_shift0 --start="FILE:prompt.txt" --num_samples=1 --mask=stochastic
"""

import os
import sys
import time

import torch

from configurator import SEED_RULE, ConfigError, configure
from runtime import (CheckpointError, RuntimeSetupError, autocast, load_model, one_line_on_out_of_memory, pick_device,
                     pick_dtype, setup_device)
from tokenizer import TokenizerError, get_codec

# -----------------------------------------------------------------------------
out_dir = 'out'  # the run folder train.py wrote
checkpoint = 'ckpt.pt'  # 'ckpt.pt' (latest) or 'best.pt' (best val loss)
start = '<|endoftext|>'  # the prompt: text, or FILE:path to read it from a file; <|endoftext|> = a new article
num_samples = 3  # samples to draw
max_new_tokens = 256  # tokens generated per sample
temperature = 0.8  # 1.0 = the model's distribution, lower = more conservative
top_k = 200  # sample only among the top_k most likely tokens (None: all)
mask = 'deterministic'  # learned model: 'deterministic' (R = [M >= 0.5]) or 'stochastic' (R ~ Bernoulli(M))
seed = 1337  # seed of the sampling
device = 'auto'  # 'auto' = cuda > mps > cpu; or e.g. 'cpu', 'cuda:1'
dtype = 'auto'  # 'auto' = bfloat16 on GPUs, float32 on CPUs (one token at a time, faster than bf16 there); or set one
# -----------------------------------------------------------------------------
RULES = {'checkpoint': ('len(x) > 0', 'a file name in out_dir'), 'num_samples': 'x >= 1', 'max_new_tokens': 'x >= 1',
         'temperature': ('x > 0', '> 0 (lower is more conservative)'),
         'top_k': ('x is None or type(x) is int and x >= 1', 'None (all tokens) or an int >= 1'),
         'mask': "x in ('deterministic', 'stochastic')", 'dtype': "x in ('auto', 'float32', 'bfloat16', 'float16')",
         'seed': SEED_RULE}
DOCUMENT_BREAK = '\n\n[new document]\n'  # how an <|endoftext|> in the output is shown


def fail(message, code=1):
    print(f"sample.py: error: {message}", file=sys.stderr)
    sys.exit(code)


try:
    globals().update(configure({k: globals()[k] for k in (
        'out_dir', 'checkpoint', 'start', 'num_samples', 'max_new_tokens', 'temperature', 'top_k', 'mask',
        'seed', 'device', 'dtype')}, sys.argv[1:], __file__, __doc__, RULES))
    device = pick_device(device)
except (ConfigError, RuntimeSetupError) as e:
    fail(str(e), code=2)
one_line_on_out_of_memory('sample.py', "lower num_samples or max_new_tokens, or sample on another device")

device_type = 'cuda' if device.startswith('cuda') else device.split(':')[0]
setup_device(device_type)
# generation feeds one token at a time: on a CPU float32 beats bf16 autocast there (BENCHMARK.md)
dtype = 'float32' if dtype == 'auto' and device_type == 'cpu' else pick_dtype(dtype, device_type)
ctx = autocast(dtype, device_type)
try:
    model, ckpt = load_model(os.path.join(out_dir, checkpoint), device)
    encode, decode = get_codec(model.config.vocab_size, ckpt.get('tokenizer_cut'))
except (CheckpointError, TokenizerError) as e:
    fail(str(e))
if hasattr(model, 'set_mask_mode'):  # a model with learned masks
    model.set_mask_mode(mask)
elif mask != 'deterministic':
    fail(f"mask='stochastic' needs a learned model; this checkpoint is a {ckpt['model_type']} model", code=2)

if start.startswith('FILE:'):
    try:
        with open(start[5:], encoding='utf-8') as f:
            start = f.read()
    except OSError as e:
        fail(f"cannot read the prompt file {start[5:]}: {e.strerror}")
    except UnicodeDecodeError:
        fail(f"the prompt file {start[5:]} is not UTF-8 text", code=2)
start_ids = encode(start)
if not start_ids:
    fail("the prompt is empty; give some text or <|endoftext|>", code=2)
block_size = model.config.block_size
if len(start_ids) > block_size:
    print(f"note: the prompt has {len(start_ids)} tokens, more than block_size={block_size}; "
          f"the model sees its last {block_size} tokens", file=sys.stderr)
x = torch.tensor(start_ids, dtype=torch.long, device=device)[None, ...]
# the default prompt (a new document) is not echoed; a prompt of the user's is, followed by its continuation
echo = start.strip() != '<|endoftext|>'

torch.manual_seed(seed)
if device_type == 'cuda':
    torch.cuda.manual_seed(seed)
t0 = time.time()
try:
    with torch.no_grad(), ctx:
        for k in range(num_samples):
            y = model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k)
            text = decode(y[0].tolist() if echo else y[0, x.size(1):].tolist())
            print(f"==== sample {k + 1}/{num_samples} ====")
            print(text.replace('<|endoftext|>', DOCUMENT_BREAK).strip('\n'))
            print()
    if device_type == 'cuda':
        torch.cuda.synchronize()
    dt = time.time() - t0
    print(f"{num_samples * max_new_tokens} tokens in {dt:.2f} s ({num_samples * max_new_tokens / dt:,.1f} tokens/s, "
          f"{ckpt['model_type']} model, iter {ckpt['iter_num']}, {device}, {dtype})")
    sys.stdout.flush()  # here, not at exit: a closed pipe is then caught below
except BrokenPipeError:  # the reader stopped reading (sample.py ... | head -n1): stop quietly, as cat would
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's own last flush then goes nowhere
    sys.exit(141)  # 128 + SIGPIPE, the code of a tool stopped by a closed pipe
