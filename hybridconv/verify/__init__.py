"""Verification: does a converted MLX folder compute the same function as its
PyTorch original, and if not, where does it first diverge?

* :mod:`.reference` runs the source checkpoint in PyTorch (the only place
  outside tests that imports torch) or reads a reference-logits file;
* :mod:`.inputs` builds the token sequences;
* :mod:`.metrics` compares logits (KL, top-k agreement, perplexity) and hidden
  states;
* :mod:`.gates` holds the per-precision thresholds and their reasoning;
* :mod:`.run` puts it together into a report and a verdict.
"""
