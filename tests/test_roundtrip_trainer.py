"""Round trip through the real trainer: train the debug model on 2 CPU ranks (FSDP2, then TP 2)
with checkpointing on, convert the DCP checkpoints, and check the standalone model's logits
against the trainer's model restored from the same checkpoint by torchtitan's own code path
(its train spec's model class, ``ModelWrapper`` and DCP load). The TP run is seeded from a
converted model through the reverse direction (standalone -> DCP)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomli
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

from rat_plugin.generate import generate, load
from rat_plugin.model import RATModel, make_args

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
from convert_checkpoint import main as convert_main  # noqa: E402

SEQ_LEN = 64
CONFIG = REPO / "train_configs" / "rat_debug.toml"


def train(dump: Path, *options: str, steps: int = 2) -> None:
    """``steps`` steps of rat_debug.toml with a checkpoint at every step: full ones, except the
    last, which is model-only (``last_save_model_only``)."""
    if not (REPO / "assets" / "data" / "rat_debug" / "train.jsonl").is_file():
        subprocess.run([sys.executable, "-m", "rat_plugin.data.prepare"], cwd=REPO, check=True)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "torchtitan.train", "--job.config_file", "train_configs/rat_debug.toml",
        "--job.dump_folder", str(dump), "--training.steps", str(steps),
        "--training.local_batch_size", "2",
        "--training.seq_len", str(SEQ_LEN), "--checkpoint.enable", "--checkpoint.interval", "1",
        "--metrics.no-enable-tensorboard", *options,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def trainer_model(step_dir: Path):
    """The RAT model as torchtitan builds and restores it (model-only load of a step folder)."""
    from torchtitan.components.checkpoint import ModelWrapper
    from torchtitan.protocols.train_spec import get_train_spec

    import rat_plugin.train_spec  # noqa: F401  (registers the train specs)

    spec = get_train_spec("rat")
    args = spec.model_args["debugmodel"]
    model = spec.model_cls(args)
    model.init_weights()
    wrapper = ModelWrapper(model)
    state = wrapper.state_dict()
    dcp.load(state, checkpoint_id=str(step_dir), no_dist=True)
    wrapper.load_state_dict(state)
    return model.eval()


def convert(step_dir: Path, out: Path, capsys) -> None:
    argv = [str(step_dir), str(out), "--config", str(CONFIG), "--seq-len", str(SEQ_LEN)]
    assert convert_main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "kind=rat flavor=debugmodel (from config" in out and "tokenizer: copied" in out


def check_same_logits(step_dir: Path, out: Path) -> torch.Tensor:
    reference = trainer_model(step_dir)
    standalone = load(out, dtype="fp32")
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, reference.args.vocab_size, (3, 2 * SEQ_LEN), generator=generator)
    with torch.no_grad():
        want, got = reference(tokens), standalone(tokens)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # Cached generation from the converted model agrees with the trainer model's forward.
    result = generate(standalone, [tokens[0, :20].tolist()], 4, return_logits=True)
    with torch.no_grad():
        full = reference(torch.tensor([tokens[0, :20].tolist() + result.tokens[0][:3]]))[0, 19:]
    torch.testing.assert_close(result.logits[0], full, atol=1e-5, rtol=0)
    return standalone.tok_embeddings.weight


def check_run(run: Path, tmp_path: Path, capsys) -> None:
    """Both checkpoints of a run convert to the model torchtitan restores from them."""
    embeddings = []
    for step in ("step-1", "step-2"):  # full checkpoint (with optimizer etc.), then model-only
        out = tmp_path / f"{run.name}-{step}"
        convert(run / "checkpoint" / step, out, capsys)
        embeddings.append(check_same_logits(run / "checkpoint" / step, out))
    assert not torch.equal(*embeddings), "training did not change the weights between steps"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_fsdp2_checkpoints_convert_to_the_trainer_model(tmp_path, capsys):
    torch.set_num_threads(1)
    train(tmp_path / "run")
    check_run(tmp_path / "run", tmp_path, capsys)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tp2_training_seeded_from_a_converted_model(tmp_path, capsys):
    """A converted model, written back as DCP (--to-dcp), seeds a TP 2 run through
    ``checkpoint.initial_load_path``; that run's checkpoints convert to the trainer's model, and
    its first step moved every weight by at most one AdamW step from the seed
    (|update| <= lr * (1 + weight_decay * |w|)), which a run from a fresh init would not be."""
    torch.set_num_threads(1)
    torch.manual_seed(3)
    model = RATModel(make_args("rat", "debugmodel", max_seq_len=SEQ_LEN))
    model.init_weights()
    dcp.save(model.state_dict(), checkpoint_id=str(tmp_path / "orig"), no_dist=True)
    convert(tmp_path / "orig", tmp_path / "standalone", capsys)
    assert convert_main([str(tmp_path / "standalone"), str(tmp_path / "seed"), "--to-dcp"]) == 0
    train(tmp_path / "run", "--parallelism.data_parallel_shard_degree", "1",
          "--parallelism.tensor_parallel_degree", "2",
          "--checkpoint.initial_load_path", str(tmp_path / "seed"))
    check_run(tmp_path / "run", tmp_path, capsys)

    with open(CONFIG, "rb") as f:
        optimizer = tomli.load(f)["optimizer"]
    lr, decay = optimizer["lr"], optimizer["weight_decay"]
    seed = load_file(str(tmp_path / "standalone" / "model.safetensors"))
    step1 = load_file(str(tmp_path / "run-step-1" / "model.safetensors"))
    assert seed.keys() == step1.keys()
    moved = 0.0
    for name, before in seed.items():
        bound = lr * (1 + decay * before.abs()) * (1 + 1e-4) + 1e-7
        change = (step1[name] - before).abs()
        assert (change <= bound).all(), f"{name} moved {change.max():.2e} > one AdamW step"
        moved = max(moved, float(change.max()))
    assert moved > lr / 100, "the first step did not train"
