"""Document-aware training (docs/design.md section 7): a packed window of documents, each on a
chunk boundary with filler after it, computes every document exactly as if it were alone from
position 0, for every model kind and kernel choice: logits (fp32, 1e-5) and the gradients of
the summed per-document losses. The oracle is the model run on each document by itself."""

import pytest
import torch
import torch.nn.functional as F

from rat_plugin.model import RATModel, make_args

pytestmark = [
    pytest.mark.usefixtures("one_thread", "cpu_flex_backward"),
    pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile"),
]

L = 16
# 1, L-1, L, L+1, 3L+5 tokens, then one spanning the rest of the window (240 of 384 tokens).
LENGTHS = [1, L - 1, L, L + 1, 3 * L + 5, 240]
SEQ_LEN = 384
KERNELS = {"portable": ("torch", "torch"), "gpu": ("triton", "flex")}


def build(kind: str, kernels: tuple[str, str]) -> RATModel:
    window = {"swa_window": 64} if kind.endswith("swa") else {}
    args = make_args(kind, "debugmodel", n_layers=2, vocab_size=256, scan_kernel=kernels[0],
                     attention_kernel=kernels[1], **window)
    torch.manual_seed(0)
    model = RATModel(args)
    model.init_weights()
    return model


def packed_window(gen: torch.Generator):
    """Documents at multiples of L, random filler between them: (tokens, document_starts,
    [(start, length)])."""
    tokens = torch.randint(0, 256, (SEQ_LEN,), generator=gen)
    starts = torch.zeros(SEQ_LEN, dtype=torch.long)
    spans, start = [], 0
    for length in LENGTHS:
        starts[start:] = start
        spans.append((start, length))
        start += -(-length // L) * L
    assert start == SEQ_LEN
    return tokens, starts, spans


def doc_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Summed next-token loss inside one document (its logits and tokens)."""
    return F.cross_entropy(logits[:-1], tokens[1:], reduction="sum")


@pytest.mark.parametrize("kernels", list(KERNELS))
@pytest.mark.parametrize("kind", ["rat", "rat_swa", "rat_attn", "rat_attn_swa"])
def test_packed_documents_compute_as_if_alone(kind, kernels):
    model = build(kind, KERNELS[kernels])
    gen = torch.Generator().manual_seed(1)
    rows = [packed_window(gen) for _ in range(2)]  # two sequences, different tokens
    tokens = torch.stack([r[0] for r in rows])
    starts = torch.stack([r[1] for r in rows])
    spans = rows[0][2]

    logits = model(tokens, document_starts=starts)
    loss = sum(doc_loss(logits[b, s:s + n], tokens[b, s:s + n]) for b in range(2) for s, n in spans)
    packed_grads = torch.autograd.grad(loss, list(model.parameters()))

    alone_loss = 0
    for b in range(2):
        for s, n in spans:
            alone = model(tokens[b:b + 1, s:s + n])[0]
            torch.testing.assert_close(logits[b, s:s + n], alone, rtol=1e-5, atol=1e-5,
                                       msg=f"document at {s} of {n} tokens")
            alone_loss = alone_loss + doc_loss(alone, tokens[b, s:s + n])
    alone_grads = torch.autograd.grad(alone_loss, list(model.parameters()))
    for (name, _), got, want in zip(model.named_parameters(), packed_grads, alone_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)


def test_without_document_starts_documents_see_each_other():
    """The negative control: plain packing leaks earlier documents into later ones."""
    model = build("rat", KERNELS["portable"])
    tokens, _, spans = packed_window(torch.Generator().manual_seed(1))
    logits = model(tokens[None])[0]
    s, n = spans[-1]
    assert not torch.allclose(logits[s:s + n], model(tokens[None, s:s + n])[0], atol=1e-3)


def test_misaligned_document_start_is_refused():
    model = build("rat", KERNELS["portable"])
    starts = torch.zeros(1, 64, dtype=torch.long)
    starts[0, 20:] = 20
    with pytest.raises(RuntimeError, match="must start on chunk boundaries"):
        model(torch.zeros(1, 64, dtype=torch.long), document_starts=starts)


# ------------------------------------------------------------------ packing


@pytest.fixture
def packed(tmp_path, debug_assets):
    """A document-aware dataset over documents of 1 to 60 words, and their token ids."""
    import json

    from datasets import Dataset
    from torchtitan.components.tokenizer import HuggingFaceTokenizer

    import rat_plugin.train_spec  # noqa: F401  (registers the datasets)
    from rat_plugin.data.packing import DocumentPackedDataset

    words = "the cat sat on a mat and then it ran far away".split()
    texts = [" ".join(words[i % 12] for i in range(n)) for n in (1, 5, 60, 14, 2, 33, 9, 41)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (tmp_path / "streamed").mkdir()
    Dataset.from_dict({"text": texts}).to_parquet(tmp_path / "streamed" / "train.parquet")
    tokenizer = HuggingFaceTokenizer(str(debug_assets / "tokenizer"))

    def make(streamed=False):
        """The map-style debug dataset, or FineWeb-Edu's streamed parquet reader."""
        name, path = ("fineweb_edu", tmp_path / "streamed") if streamed else ("rat_debug", tmp_path)
        return DocumentPackedDataset(name, str(path), tokenizer, seq_len=64, chunk_size=L)

    documents = [tokenizer.encode(t, add_bos=True, add_eos=True) for t in texts]
    return make, documents, tokenizer


def test_packing_starts_every_document_on_a_chunk_boundary(packed):
    make, documents, tokenizer = packed
    windows = list(iter(make()))
    assert len(windows) >= 3
    stream, labels = [], []
    for inputs, label in windows:
        tokens, starts = inputs["input"], inputs["document_starts"]
        assert tokens.shape == starts.shape == label.shape == (64,)
        assert bool((starts % L == 0).all())
        is_start = torch.arange(64) == starts
        # A window begins inside a document or at one; every other start is a BOS.
        assert bool((tokens[is_start][1:] == tokenizer.bos_id).all())
        stream += tokens.tolist()
        labels += label.tolist()
    # Documents follow each other, each padded with EOS to a multiple of L.
    expected, expected_labels = [], []
    for doc in documents:
        filler = -len(doc) % L
        expected += doc + [tokenizer.eos_id] * filler
        expected_labels += doc[1:] + [-100] * (filler + 1)  # no label after EOS or on filler
    assert stream == expected[: len(stream)]
    assert labels == expected_labels[: len(labels)]


def test_packing_resumes_exactly_from_its_state(packed):
    make, _, _ = packed
    reference = list(iter(make()))
    first = make()
    it = iter(first)
    next(it), next(it)
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    for (inputs, labels), (want_inputs, want_labels) in zip(iter(resumed), reference[2:]):
        for name in ("input", "document_starts"):
            assert torch.equal(inputs[name], want_inputs[name])
        assert torch.equal(labels, want_labels)


@pytest.mark.parametrize("streamed", [False, True], ids=["map", "streamed"])
def test_measuring_the_waste_leaves_the_data_at_its_start(packed, streamed):
    """The waste is measured by reading the first documents; a streamed dataset's checkpointed
    position (what the validator rewinds to before each run) must still be the first one."""
    make, _, _ = packed
    reference = list(iter(make(streamed)))
    resumed = make(streamed)
    resumed.load_state_dict(make(streamed).state_dict())
    windows = list(iter(resumed))
    assert len(windows) == len(reference)
    for (inputs, labels), (want_inputs, want_labels) in zip(windows, reference):
        assert torch.equal(inputs["input"], want_inputs["input"])
        assert torch.equal(labels, want_labels)


def test_a_tokenizer_without_eos_is_refused_when_built(packed):
    make, _, tokenizer = packed
    tokenizer.eos_id = None
    with pytest.raises(ValueError, match="the tokenizer has no EOS token, which ends each "
                       "document and fills the gap to the next chunk"):
        make()


def test_resuming_a_plain_run_document_aware_is_one_line(packed, tmp_path):
    from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataset

    from rat_plugin.infra import ConfigError

    make, _, tokenizer = packed
    plain = HuggingFaceTextDataset("rat_debug", str(tmp_path), tokenizer, seq_len=64)
    next(iter(plain))
    with pytest.raises(ConfigError, match=r"^\[rat\] document_aware = true, but the "
                       r"checkpoint's data position was saved without it: resume with the "
                       r"setting the run was started with"):
        make().load_state_dict(plain.state_dict())


def test_padding_waste_is_under_a_chunk_per_document(packed):
    make, documents, _ = packed
    padding, packed_tokens, count = make().padding_waste()
    assert count == len(documents)
    assert padding == sum(-len(d) % L for d in documents) < L * len(documents)
    assert packed_tokens == sum(len(d) for d in documents) + padding


# ------------------------------------------------------------------ trainer


@pytest.mark.slow
@pytest.mark.parametrize("config", ["rat_debug.toml", "rat_swa_debug.toml"])
def test_trainer_trains_document_aware(config, tmp_path, debug_assets):
    """The switch through torchtitan's trainer (2 CPU ranks, FSDP): the waste is logged at
    start, the loss falls."""
    from conftest import launch, tb_losses

    run = launch(config, tmp_path, "--rat.document_aware", "--training.steps=12",
                 "--training.local_batch_size=4")
    assert run.returncode == 0, run.stdout[-4000:]
    assert "Document-aware packing (chunk_size=16): padding is" in run.stdout
    losses = tb_losses(tmp_path)
    assert sorted(losses) == list(range(1, 13))
    assert losses[12] < losses[1] - 1.0, losses
