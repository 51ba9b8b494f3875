# A control for the LearnedDropout GPT: random masks at the method's site (the MLP output), each channel
# kept with a fixed probability q = 0.5 cos(shift_init) + 0.5, not learned and not rescaled
# (model.RandomMask): is learning the mask needed? q = 0.53, the training keep of learned_shift0 in
# the v2 study (results/study/REPORT.md); set q to the rate your learned runs keep.
# The seed run's shared settings (context 200, micro-batch 50 x 16 accumulation, AdamW 9e-4,
# 26,000 steps, ...) are train.py's defaults; see METHOD.md section 6 (The seed experiments).
import math

out_dir = 'out/learned_random'
dataset = 'wikipedia'  # python prepare_wiki.py --max_tokens=42600000 (about the seed's 42.6M tokens)
model_type = 'learned'
n_layer = 26
n_embd = 144
n_head = 9
dropout = 0.0
penalty_coeff = 0.0  # M is fixed: the penalty would be a constant
shift_init = math.acos(2 * 0.53 - 1)
mask_class = 'model.RandomMask'
