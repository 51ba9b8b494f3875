# LearnedDropout GPT with soft masks, a control: the MLP output is multiplied by M itself, with no
# sampling or rounding in training or in eval (R = M, so the logged 'keep' is mean(M)). Otherwise
# learned_shift0: same parameters (15,335,424) and FLOPs per token (109,983,744).
# The seed run's shared settings (context 200, micro-batch 50 x 16 accumulation, AdamW 9e-4,
# 26,000 steps, ...) are train.py's defaults; see METHOD.md section 6 (The seed experiments).
out_dir = 'out/learned_soft'
dataset = 'wikipedia'  # python prepare_wiki.py --max_tokens=42600000 (about the seed's 42.6M tokens)
model_type = 'learned'
n_layer = 26
n_embd = 144
n_head = 9
dropout = 0.0
penalty_coeff = 0.1
shift_init = 0.0
mask_rounding = 'soft'
