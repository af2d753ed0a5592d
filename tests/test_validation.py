"""Validation during training (``[validation]``, ``rat_plugin/infra/validate.py``): the held-out
debug split, the validator against a plain loop over the same tokens, the one-line errors, and
torchtitan's trainer validating at the configured interval with equal losses on 1 rank and FSDP 2.

torchtitan 0.2.2's own Validator fails these for RAT: it asks the model for attention masks
(``get_attention_masks``, which RAT has no use for), under CP it reaches for SDPA ring-attention
buffers (``freqs_cis``) and divides by the CP-sharded token count, and its loader keeps its
position, so each validation reads other batches (with ``steps = -1`` the second one finds no
data).
"""

import contextlib
import itertools
import json
import math
import re

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchtitan.config import ConfigManager
from torchtitan.distributed import ParallelDims

import rat_plugin.train_spec as ts
from conftest import REPO, launch, tb_losses
from rat_plugin.infra import ConfigError, NonFiniteError
from rat_plugin.infra.guards import build_finite_loss
from rat_plugin.infra.validate import RATValidator
from rat_plugin.model import RATModel, make_args

SEQ_LEN, BATCH, STEPS = 64, 2, 3


def job(config: str = "rat_debug.toml", *overrides: str):
    return ConfigManager().parse_args(
        ["--job.config_file", str(REPO / "train_configs" / config), *overrides]
    )


@pytest.fixture
def repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)  # configs name paths relative to the repo root


def read_texts(path) -> list[str]:
    with open(path) as f:
        return [json.loads(line)["text"] for line in f]


def test_debug_validation_split_is_held_out(debug_assets):
    data = debug_assets / "data" / "rat_debug"
    train, validation = read_texts(data / "train.jsonl"), read_texts(data / "validation.jsonl")
    assert len(validation) == 300 and len(set(validation)) == 300
    assert not set(validation) & set(train)


class RecordingMetrics:
    """The part of torchtitan's MetricsProcessor the validator uses."""

    def __init__(self):
        self.ntokens_since_last_log = 0
        self.logged: list[tuple[int, float, dict]] = []

    def log_validation(self, loss, step, extra_metrics=None):
        self.logged.append((step, loss, extra_metrics))


@pytest.fixture
def one_rank(tmp_path):
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1),
                           rank=0, world_size=1)
    yield ParallelDims(dp_shard=1, dp_replicate=1, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=1)
    dist.destroy_process_group()


def make_validator(config, parallel_dims) -> tuple[RATValidator, RecordingMetrics]:
    metrics = RecordingMetrics()
    validator = ts.build_rat_validator(
        job_config=config, dp_world_size=1, dp_rank=0, tokenizer=ts.build_tokenizer(config),
        parallel_dims=parallel_dims, loss_fn=build_finite_loss(config),
        validation_context=contextlib.nullcontext, maybe_enable_amp=contextlib.nullcontext(),
        metrics_processor=metrics,
    )
    return validator, metrics


def small_model(vocab_size: int) -> RATModel:
    torch.manual_seed(0)
    model = RATModel(make_args("rat", "debugmodel", dim=64, n_layers=2, ffn_hidden_dim=128,
                               vocab_size=vocab_size))
    model.init_weights()
    return model


def held_out_windows(config, count: int) -> torch.Tensor:
    """The first ``count`` windows of SEQ_LEN + 1 tokens of the validation split, packed by hand:
    every story as BOS + tokens + EOS, one after the other."""
    tokenizer = ts.build_tokenizer(config)
    stream = []
    for text in read_texts(REPO / "assets" / "data" / "rat_debug" / "validation.jsonl"):
        stream += tokenizer.encode(text, add_bos=True, add_eos=True)
        if len(stream) >= count * (SEQ_LEN + 1):
            break
    return torch.tensor(stream[: count * (SEQ_LEN + 1)]).view(count, SEQ_LEN + 1)


@pytest.mark.usefixtures("repo_cwd", "one_thread")
def test_validator_is_the_mean_loss_over_the_same_held_out_tokens(one_rank):
    config = job("rat_debug.toml", f"--validation.seq_len={SEQ_LEN}",
                 f"--validation.local_batch_size={BATCH}", f"--validation.steps={STEPS}")
    validator, metrics = make_validator(config, one_rank)
    model = small_model(2048)
    validator.validate([model], step=1)
    validator.validate([model], step=2)  # the same batches again, not the next ones
    assert model.training  # handed back in train mode

    windows = held_out_windows(config, BATCH * STEPS)
    with torch.no_grad():
        logits = model.eval()(windows[:, :-1])
    want = F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item()
    assert [step for step, _, _ in metrics.logged] == [1, 2]
    for _, loss, extra in metrics.logged:
        assert loss == pytest.approx(want, rel=1e-6)
        assert extra["validation_metrics/perplexity"] == pytest.approx(math.exp(want), rel=1e-6)


@pytest.mark.usefixtures("repo_cwd", "one_thread")
def test_document_aware_validation_is_each_document_alone(one_rank):
    """With ``[rat] document_aware`` the held-out documents are packed as in training and the
    loss is that of each document alone: the oracle cuts every window at its document starts
    and runs the pieces one by one, without document_starts."""
    config = job("rat_debug.toml", "--rat.document_aware", f"--validation.seq_len={SEQ_LEN}",
                 f"--validation.local_batch_size={BATCH}", f"--validation.steps={STEPS}")
    validator, metrics = make_validator(config, one_rank)
    model = small_model(2048)
    validator.validate([model], step=1)

    loader = ts.document_packed_loader(config, "validation", ts.build_tokenizer(config), 0, 1,
                                       infinite=True)
    total, count, pieces, plain = 0.0, 0, 0, []
    with torch.no_grad():
        for inputs, labels in itertools.islice(iter(loader), STEPS):
            logits = model.eval()(inputs["input"])  # the documents see each other
            plain.append(F.cross_entropy(logits.flatten(0, 1), labels.flatten()))
            for tokens, starts, label in zip(inputs["input"], inputs["document_starts"], labels):
                bounds = starts.unique().tolist() + [SEQ_LEN]
                for a, b in zip(bounds, bounds[1:]):
                    logits = model(tokens[None, a:b])[0]
                    total += F.cross_entropy(logits, label[a:b], reduction="sum").item()
                    count += int((label[a:b] != -100).sum())
                    pieces += 1
    assert pieces > BATCH * STEPS  # windows with several documents
    want = total / count
    ((step, loss, _),) = metrics.logged
    assert loss == pytest.approx(want, rel=1e-5)
    assert abs(torch.stack(plain).mean().item() - want) > 1e-3  # the masks made a difference


@pytest.mark.usefixtures("repo_cwd")
def test_non_finite_validation_stops_the_run_naming_the_step(one_rank):
    """Validation runs after the step's checkpoint save: the error says so (not the training
    guard's "stopped before the optimizer step")."""
    config = job("rat_debug.toml", f"--validation.seq_len={SEQ_LEN}", "--validation.steps=1")
    validator, metrics = make_validator(config, one_rank)
    model = small_model(2048)
    with torch.no_grad():
        model.norm.weight[0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"^the validation loss at step 7 is nan: the weights "
                       r"of step 7 .* \(a checkpoint saved at this step holds them\): resume from "
                       r"an earlier checkpoint \(--checkpoint.load_step\)"):
        validator.validate([model], step=7)
    assert metrics.logged == []


@pytest.mark.usefixtures("repo_cwd")
def test_validation_without_a_whole_batch_is_one_line(one_rank):
    config = job("rat_debug.toml", "--validation.seq_len=1048576", "--validation.steps=-1")
    validator, _ = make_validator(config, one_rank)
    with pytest.raises(ConfigError, match=r"gave no batch of seq_len=1048576: use more data or "
                       r"a shorter \[validation\] seq_len"):
        validator.validate([small_model(2048)], step=1)


@pytest.mark.usefixtures("repo_cwd")
@pytest.mark.parametrize(
    "config,overrides,error",
    [
        ("rat_debug.toml", ("--validation.dataset_path=/nonexistent",),
         r"'rat_debug_validation' not found at /nonexistent/validation.jsonl: set \[validation\] "
         r"dataset_path \(--validation.dataset_path\) or run `python -m rat_plugin.data.prepare`"),
        ("rat_1p3b.toml", (),
         r"'fineweb_edu_validation' not found at ./data/fineweb-edu/validation/?: set "
         r"\[validation\] dataset_path .* move a FineWeb-Edu parquet file out of the training"),
    ],
)
def test_missing_validation_data_names_the_setting(config, overrides, error):
    with pytest.raises(ConfigError, match=error):
        ts.build_rat_validator(job_config=job(config, *overrides))


@pytest.mark.usefixtures("repo_cwd")
def test_reading_the_split_to_its_end_under_fsdp_is_refused():
    """Ranks' shares end after different numbers of batches: under FSDP the first rank done
    would wait in the loss all-reduce while the others all-gather weights for another batch."""
    fsdp2 = ParallelDims(dp_shard=2, dp_replicate=1, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=2)
    with pytest.raises(ConfigError, match=r"^\[validation\] steps = -1 reads each of the 2 "
                       r"data-parallel ranks' share .*: set steps to a number of batches every "
                       r"rank has$"):
        ts.build_rat_validator(job_config=job("rat_debug.toml", "--validation.steps=-1"),
                               dp_world_size=2, parallel_dims=fsdp2)


def test_shipped_configs_validate(repo_cwd):
    for path in sorted((REPO / "train_configs").glob("*.toml")):
        validation = job(path.name).validation
        assert validation.enable and validation.steps > 0, path.name
        assert validation.seq_len == job(path.name).training.seq_len, path.name
        assert validation.dataset.endswith("_validation"), path.name


# ---- torchtitan's trainer: 1 rank and FSDP 2 validate the same held-out data ------------------

TRAIN_STEPS, FREQ = 4, 2
VALIDATED = [1, 2, 4]  # step 1, then every FREQ steps
VALIDATE_LINE = re.compile(r"validate step:\s*(\d+)\s+loss:\s*([0-9.]+)")
SHAPE = ("--training.local_batch_size=2", "--training.seq_len=128", "--validation.seq_len=128",
         "--validation.local_batch_size=2", "--validation.steps=2", f"--validation.freq={FREQ}",
         f"--training.steps={TRAIN_STEPS}", "--metrics.log_freq=1")


@pytest.fixture(scope="module")
def twice_the_data(tmp_path_factory, debug_assets):
    """A data folder whose two halves are the same stories, train and validation: FSDP's rank 0
    reads the first half, rank 1 the second, so both ranks read exactly the batches one process
    reads from the first half."""
    folder = tmp_path_factory.mktemp("twice")
    source = debug_assets / "data" / "rat_debug"
    for split, count in (("train", 60), ("validation", 40)):
        lines = (source / f"{split}.jsonl").read_text().splitlines()[:count]
        (folder / f"{split}.jsonl").write_text("\n".join(lines + lines) + "\n")
    return folder


def validated_run(name: str, nproc: int, data, seed, root) -> tuple[dict, dict, dict]:
    dump = root / name
    run = launch("rat_debug.toml", dump, *SHAPE, f"--training.dataset_path={data}",
                 f"--validation.dataset_path={data}", "--checkpoint.enable",
                 "--checkpoint.load_only", f"--checkpoint.initial_load_path={seed}", nproc=nproc)
    assert run.returncode == 0, run.stdout[-4000:]
    logged = {int(s): float(v) for s, v in VALIDATE_LINE.findall(run.stdout)}
    return (logged, tb_losses(dump, "validation_metrics/loss"),
            tb_losses(dump, "validation_metrics/perplexity"))


@pytest.mark.slow
def test_trainer_validates_at_the_interval_equally_on_1_rank_and_fsdp2(
        twice_the_data, seed_checkpoint, tmp_path):
    seed = seed_checkpoint("rat_debug.toml")
    one = validated_run("one", 1, twice_the_data, seed, tmp_path)
    fsdp = validated_run("fsdp2", 2, twice_the_data, seed, tmp_path)
    for logged, losses, perplexities in (one, fsdp):
        assert sorted(logged) == sorted(losses) == sorted(perplexities) == VALIDATED
        for step in VALIDATED:
            assert logged[step] == pytest.approx(losses[step], abs=1e-4)  # the log rounds
            assert perplexities[step] == pytest.approx(math.exp(losses[step]), rel=1e-5)
    one_losses, fsdp_losses = one[1], fsdp[1]
    assert one_losses[4] < one_losses[1] - 0.3  # training shows in the held-out loss
    worst = max(abs(one_losses[s] - fsdp_losses[s]) for s in VALIDATED)
    assert worst <= 1e-5, f"1 rank {one_losses} vs FSDP 2 {fsdp_losses}: differ by {worst:.2e}"
