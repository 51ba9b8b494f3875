# A control for the LearnedDropout GPT: a static learned mask, M = 0.5 cos(b) + 0.5 per channel with no
# attention (model.StaticMask), sampled, rounded and penalised as the method: does the mask need the input?
# shift_init pi/2 (M = 0.5, the steepest point): at 0 or pi a static mask can never move (dM/db = 0).
# The seed run's shared settings (context 200, micro-batch 50 x 16 accumulation, AdamW 9e-4,
# 26,000 steps, ...) are train.py's defaults; see METHOD.md section 6 (The seed experiments).
import math

out_dir = 'out/learned_static'
dataset = 'wikipedia'  # python prepare_wiki.py --max_tokens=42600000 (about the seed's 42.6M tokens)
model_type = 'learned'
n_layer = 26
n_embd = 144
n_head = 9
dropout = 0.0
penalty_coeff = 0.1
shift_init = math.pi / 2
mask_class = 'model.StaticMask'
