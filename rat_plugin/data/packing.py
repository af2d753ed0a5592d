"""Document-aware packing (docs/design.md section 7): every document starts on a chunk boundary.

torchtitan packs ``BOS text EOS`` documents back to back into windows of seq_len tokens, so a
document may start mid-chunk, and chunks hold parts of two documents. Here each document is
followed by EOS filler up to the next multiple of ``chunk_size`` (windows start on multiples of
it too), so every document's chunks are the chunks it has when it starts at position 0. Each
window comes with ``document_starts``, the window position of every token's document start (a
document cut by the window's start counts from position 0), which the model turns into masks.
Filler tokens and the token after each EOS (the next document's BOS) are never labels, as in the
RAT paper's code. The waste is under chunk_size tokens per document; it is measured over the
first documents and logged when the dataset is built.
"""

import torch
from datasets import Dataset
from torchtitan.components.loss import IGNORE_INDEX
from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataset
from torchtitan.tools.logging import logger

from rat_plugin.infra import ConfigError


class DocumentPackedDataset(HuggingFaceTextDataset):
    """torchtitan's text dataset packed document-aware; yields ``({"input": tokens,
    "document_starts": starts}, labels)``, each (seq_len,)."""

    def __init__(self, *args, chunk_size: int, **kwargs):
        super().__init__(*args, **kwargs)
        if self.seq_len % chunk_size:
            raise ValueError(
                f"seq_len={self.seq_len} is not a multiple of chunk_size={chunk_size}: "
                "document-aware windows must hold whole chunks"
            )
        if self._tokenizer.eos_id is None:
            raise ValueError(
                "the tokenizer has no EOS token, which ends each document and fills the gap "
                "to the next chunk: use a tokenizer with one"
            )
        self.chunk_size = chunk_size
        # Per buffered token: its offset in its document, and whether it may be a label.
        self._offset_buffer: list[int] = []
        self._label_buffer: list[bool] = []
        self._log_packing()

    def _log_packing(self) -> None:
        padding, packed, documents = self.padding_waste()
        logger.info(
            f"Document-aware packing (chunk_size={self.chunk_size}): padding is {padding} of "
            f"{packed} tokens ({100 * padding / max(packed, 1):.1f}%) over the first {documents} "
            "documents"
        )

    def _encode(self, sample) -> list[int]:
        return self._tokenizer.encode(self._text_processor(sample), add_bos=True, add_eos=True)

    def padding_waste(self, documents: int = 1000) -> tuple[int, int, int]:
        """(padding tokens, packed tokens, documents) over the first ``documents`` documents."""
        # Read through take(): iterating a streamed dataset itself moves its checkpointed position.
        lengths = [len(self._encode(s)) for s in self._data.take(documents)]
        padding = sum(-n % self.chunk_size for n in lengths)
        return padding, sum(lengths) + padding, len(lengths)

    def _pack(self, sample) -> None:
        """Append one sample's document to the buffers: every token but its first is a label."""
        tokens = self._encode(sample)
        self._append(tokens, [False] + [True] * (len(tokens) - 1))

    def _append(self, tokens: list[int], labels: list[bool]) -> None:
        """Append a document and the EOS filler to the next chunk boundary; ``labels`` says
        which of its tokens may be labels (filler never is)."""
        filler = -(len(self._token_buffer) + len(tokens)) % self.chunk_size
        self._token_buffer += tokens + [self._tokenizer.eos_id] * filler
        self._offset_buffer += list(range(len(tokens) + filler))
        self._label_buffer += labels + [False] * filler

    def _window(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        n = self.seq_len
        tokens = torch.tensor(self._token_buffer[: n + 1])
        offsets = torch.tensor(self._offset_buffer[:n])
        starts = (torch.arange(n) - offsets).clamp(min=0)
        labels = tokens[1:].masked_fill(~torch.tensor(self._label_buffer[1 : n + 1]), IGNORE_INDEX)
        # Keep the last token: it is the next window's first input (and this one's last label).
        for buffer in (self._token_buffer, self._offset_buffer, self._label_buffer):
            del buffer[:n]
        return {"input": tokens[:-1], "document_starts": starts}, labels

    def __iter__(self):
        while True:
            for sample in self._get_data_iter():
                self._pack(sample)
                self._sample_idx += 1
                while len(self._token_buffer) > self.seq_len:
                    yield self._window()
            if not self.infinite:
                yield from self._last_windows()
                logger.warning(f"Dataset {self.dataset_name} has run out of data")
                break
            self._sample_idx = 0
            logger.warning(f"Dataset {self.dataset_name} is being re-looped")
            if not isinstance(self._data, Dataset) and hasattr(self._data, "set_epoch"):
                self._data.set_epoch(self._data.epoch + 1)

    def _last_windows(self):
        """The windows left in the buffers when a finite dataset ends (none: torchtitan drops
        a partial last window)."""
        return ()

    def state_dict(self):
        return {
            **super().state_dict(),
            "offset_buffer": self._offset_buffer,
            "label_buffer": self._label_buffer,
        }

    def load_state_dict(self, state_dict):
        if "offset_buffer" not in state_dict:
            raise ConfigError(
                "[rat] document_aware = true, but the checkpoint's data position was saved "
                "without it: resume with the setting the run was started with, or start a new "
                "run (--checkpoint.initial_load_path) to change it"
            )
        super().load_state_dict(state_dict)
        self._offset_buffer = state_dict["offset_buffer"]
        self._label_buffer = state_dict["label_buffer"]
