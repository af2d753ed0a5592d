"""Evaluating exported model folders (no torchtitan import).

- ``scoring.py``: log-likelihoods of continuations (one forward per right-padded batch) and
  losses by position through the decode cache.
- ``harness.py``: the lm-evaluation-harness models ``rat`` and ``hf_middle`` (needs the
  ``eval`` extra); ``python -m rat_plugin.eval`` is lm_eval's command line with them registered.
- ``retrieval.py``: passkey / needle-in-a-haystack prompts and their scoring.
- ``perplexity.py``: a text's windows and the losses by position averaged into buckets.
- ``longbench.py``: LongBench's answer scoring (QA F1, ROUGE-L, ...), plain Python.
- ``ruler.py``: RULER's needle-in-a-haystack samples from a local haystack and a tokenizer.
- ``local_tasks.py`` and ``tasks/``: lm_eval tasks that run offline (LongBench and the
  generated QA set from local files, RULER's needle tasks), scored by generation.

tools/retrieval.py, tools/perplexity_by_position.py and tools/score_generation.py run them on a
model folder.
"""
