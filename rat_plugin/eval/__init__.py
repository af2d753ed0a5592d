"""Evaluating exported model folders (no torchtitan import).

- ``scoring.py``: log-likelihoods of continuations (one forward per right-padded batch) and
  losses by position through the decode cache.
- ``harness.py``: the lm-evaluation-harness model ``rat`` (needs the ``eval`` extra);
  ``python -m rat_plugin.eval`` is lm_eval's command line with it registered.
- ``retrieval.py``: passkey / needle-in-a-haystack prompts and their scoring.
- ``perplexity.py``: a text's windows and the losses by position averaged into buckets.

tools/retrieval.py and tools/perplexity_by_position.py run them on a model folder.
"""
