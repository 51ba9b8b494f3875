# Plain GPT baseline with standard dropout 0 (width 156 so both models have about 15.4M parameters).
# The seed run's shared settings (context 200, micro-batch 50 x 16 accumulation, AdamW 9e-4,
# 26,000 steps, ...) are train.py's defaults; see METHOD.md section 6 (The seed experiments).
out_dir = 'out/baseline'
dataset = 'wikipedia'  # python prepare_wiki.py --max_tokens=42600000 (about the seed's 42.6M tokens)
model_type = 'baseline'
n_layer = 26
n_embd = 156
n_head = 12
dropout = 0
