"""Local debug corpus/tokenizer generation (``prepare``) and torchtitan dataset registration."""
