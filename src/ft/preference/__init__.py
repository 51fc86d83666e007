"""Preference optimisation (DPO, SimPO, ORPO, CPO) for `ft lm preference_finetune`.

- `data`: preference rows -> `PreferencePair` (prompt + chosen / rejected response
  tokens), pair batches (chosen and rejected of a pair always in one micro-batch,
  packed with document ids) and the resumable `PairReader`;
- `logprobs`: per-sequence log-probabilities from hidden states through the output
  projection, chunk by chunk (never full [tokens, vocab] logits);
- `criteria`: the four losses, per pair, and their reward metrics;
- `reference`: the reference model's log-probabilities, computed once before
  training and stored with the run (resumable);
- `step`: the step with per-pair normalisation and the published metrics.
"""
