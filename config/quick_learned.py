# LearnedDropout GPT on the embedded Wikipedia sample, sized for the quickstart on a CPU (README, Quickstart,
# says how long it takes): python train.py config/quick_learned.py (it prepares the data on first use).
# The data is tokenized with GPT-2's BPE cut to its first 4,095 ranks + <|endoftext|> (prepare_wiki.py
# --vocab_size=4096): at this size a 50,257-word output layer would cost most of each step.
out_dir = 'out/quick_learned'
dataset = 'wiki_sample_v4096'  # python prepare_wiki.py --source=sample --vocab_size=4096 (train.py runs it)
model_type = 'learned'
n_layer = 4
n_embd = 64
n_head = 4
dropout = 0.0
penalty_coeff = 0.1
shift_init = 0.0
block_size = 128
batch_size = 8
gradient_accumulation_steps = 1
learning_rate = 3e-3
min_lr = 3e-4
warmup_iters = 30
max_iters = 500
lr_decay_iters = 500
eval_interval = 100
eval_iters = 10
log_interval = 50
