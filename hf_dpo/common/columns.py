"""Column names that travel between stages: the tokenized pair, and the cached reference log-prob sums."""

# What tokenization writes per pair: token ids and a 0/1 mask of the scored tokens, per side.
TOKENIZED_COLUMNS = ("chosen_input_ids", "chosen_response_mask", "rejected_input_ids", "rejected_response_mask")
# What a precomputed reference adds per pair (float64 sums over the scored tokens); the collators pass them
# through to the batch under the same names, and a batch that has them needs no reference forward.
REF_LOGP_COLUMNS = ("ref_chosen_logp_sums", "ref_rejected_logp_sums")
# What a batch is built from: the tokenized pair, its prompt length and row id, and any cached reference sums.
BATCH_COLUMNS = (*TOKENIZED_COLUMNS, "prompt_length", "row_id", *REF_LOGP_COLUMNS)
