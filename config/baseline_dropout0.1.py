# Plain GPT baseline with standard dropout 0.1, beside 0.2 (not a seed run: a lower rate for the study).
# The seed run's shared settings (context 200, micro-batch 50 x 16 accumulation, AdamW 9e-4,
# 26,000 steps, ...) are train.py's defaults; see METHOD.md section 6 (The seed experiments).
out_dir = 'out/baseline_dropout0.1'
dataset = 'wikipedia'  # python prepare_wiki.py --max_tokens=42600000 (about the seed's 42.6M tokens)
model_type = 'baseline'
n_layer = 26
n_embd = 156
n_head = 12
dropout = 0.1
