# Plain GPT at the LearnedDropout model's width (144, 9 heads of 16), dropout 0: a control for capacity.
# The learned model is narrower than the baseline so that its mask attention fits in the same parameter
# count; this row has the learned model's residual width without the mask attention (13,714,272
# parameters against 15,335,424), so learned_shift0 - baseline_narrow is the masks' effect at equal width.
# The seed run's shared settings (context 200, micro-batch 50 x 16 accumulation, AdamW 9e-4,
# 26,000 steps, ...) are train.py's defaults; see METHOD.md section 6 (The seed experiments).
out_dir = 'out/baseline_narrow'
dataset = 'wikipedia'  # python prepare_wiki.py --max_tokens=42600000 (about the seed's 42.6M tokens)
model_type = 'baseline'
n_layer = 26
n_embd = 144
n_head = 9
dropout = 0
