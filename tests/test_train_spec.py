"""The torchtitan integration without launching training: registration, config validation
(the code the trainer calls), FLOP counting against brute-force masks, the shipped configs,
the generated debug assets, and FSDP keeping the tied embedding/head in one unit."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torchtitan.config import ConfigManager
from torchtitan.distributed import ParallelDims
from torchtitan.protocols.model_converter import build_model_converters
from torchtitan.protocols.train_spec import get_train_spec

import rat_plugin.train_spec as ts
from conftest import REPO
from rat_plugin.infra import ConfigError
from rat_plugin.model.args import FLAVORS, make_args
from rat_plugin.model.model import RATModel

KINDS = ("rat", "rat_swa", "rat_attn", "rat_attn_swa")


def job(config: str = "rat_debug.toml", *overrides: str):
    return ConfigManager().parse_args(
        ["--job.config_file", str(REPO / "train_configs" / config), *overrides]
    )


def one_rank_dims() -> ParallelDims:
    return ParallelDims(dp_shard=1, dp_replicate=1, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=1)


@pytest.fixture(autouse=True)
def repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)  # configs name paths relative to the repo root


@pytest.mark.parametrize("kind", KINDS)
def test_registered_with_all_flavors(kind):
    spec = get_train_spec(kind)
    assert spec.model_cls is RATModel
    assert list(spec.model_args) == list(FLAVORS)
    for flavor, args in spec.model_args.items():
        assert isinstance(args, ts.BaseModelArgs)
        plain = make_args(kind, flavor)
        assert {f: getattr(args, f) for f in vars(plain)} == vars(plain)


def test_unknown_flavor_lists_flavors():
    with pytest.raises(ConfigError, match=r"flavor='2B' is unknown for rat: choose one of "
                       r"\['debugmodel', '1.3B', '7B', '13B'\]"):
        get_train_spec("rat").model_args["2B"]


def fresh_args(kind="rat", flavor="debugmodel", **overrides):
    return ts.RATTitanArgs(**vars(make_args(kind, flavor, **overrides)))


def test_update_from_config_sets_seq_len(debug_assets):
    args = fresh_args()
    args.update_from_config(job("rat_debug.toml", "--training.seq_len", "512"))
    assert args.max_seq_len == 512


def test_seq_len_must_be_whole_chunks(debug_assets):
    with pytest.raises(ConfigError, match=r"seq_len=250 is not a multiple of chunk_size=16: "
                       r"use seq_len=240 or 256"):
        fresh_args().update_from_config(job("rat_debug.toml", "--training.seq_len", "250"))
    # Attention-only models have no chunks.
    fresh_args("rat_attn").update_from_config(job("rat_debug.toml", "--training.seq_len", "250"))


def test_context_parallel_pieces_must_be_whole_chunks(debug_assets):
    config = job("rat_debug.toml", "--training.seq_len", "240",
                 "--parallelism.context_parallel_degree", "2")
    with pytest.raises(ConfigError, match="4 context-parallel pieces.*multiple of 64"):
        fresh_args().update_from_config(config)


def test_tokenizer_must_fit_vocab(debug_assets):
    with pytest.raises(ConfigError,
                       match=r"has token ids up to 723 but the model's vocab_size is 100"):
        fresh_args(vocab_size=100).update_from_config(job())


def test_missing_tokenizer_names_the_setting(tmp_path):
    config = job("rat_debug.toml", "--model.hf_assets_path", str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match=r"set \[model\] hf_assets_path"):
        ts.build_tokenizer(config)
    with pytest.raises(ConfigError, match=r"set \[model\] hf_assets_path"):
        ts.build_tokenizer(job("rat_1p3b.toml"))


def test_missing_dataset_names_the_setting(debug_assets, tmp_path):
    config = job("rat_debug.toml", "--training.dataset_path", str(tmp_path))
    with pytest.raises(ConfigError, match=r"set \[training\] dataset_path .*rat_plugin.data"):
        ts.build_dataloader(dp_world_size=1, dp_rank=0, tokenizer=None, job_config=config)
    with pytest.raises(ConfigError, match=r"fineweb_edu.*set \[training\] dataset_path"):
        ts.build_dataloader(dp_world_size=1, dp_rank=0, tokenizer=None,
                            job_config=job("rat_1p3b.toml"))


@pytest.mark.parametrize(
    "options,env,chosen,logged",
    [
        ((), {}, ("torch", "torch"), "scan=torch (portable), attention=torch (portable); "
         "[rat] scan_kernel='auto', attention_kernel='auto'"),
        (("--rat.scan_kernel", "triton"), {}, ("triton", "torch"),
         "scan=triton (Triton custom op, CPU body), attention=torch (portable)"),
        (("--rat.scan_kernel", "triton"), {"RAT_KERNELS": "torch"}, ("torch", "torch"),
         "attention_kernel='auto'; RAT_KERNELS=torch"),
    ],
)
def test_kernel_choice_is_resolved_once_and_logged(options, env, chosen, logged, caplog,
                                                   monkeypatch, debug_assets):
    for name in ("RAT_KERNELS", "RAT_ATTENTION"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = fresh_args()
    with caplog.at_level("INFO"):
        args.update_from_config(job("rat_debug.toml", *options))
    assert (args.scan_kernel, args.attention_kernel) == chosen
    assert "RAT kernels: " in caplog.text and logged in caplog.text


@pytest.mark.parametrize(
    "options,error",
    [
        (("--rat.scan_kernel", "fast"), r"\[rat\] scan_kernel='fast' is not one of auto, torch, "
         "triton"),
        (("--rat.attention_kernel", "flex"), r"attention_kernel=flex cannot train on CPU ranks .*"
         "tools/dry_run.py"),
    ],
)
def test_bad_kernel_choice_is_a_config_error(options, error, monkeypatch, debug_assets):
    for name in ("RAT_KERNELS", "RAT_ATTENTION"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match=error):
        fresh_args().update_from_config(job("rat_debug.toml", *options))


def test_float8_converter_name_points_at_the_real_one():
    config = job("rat_debug.toml", "--model.converters", "float8")
    with pytest.raises(ConfigError, match=r'named "quantize.linear.float8"'):
        build_model_converters(config, one_rank_dims())


def test_debug_dataloader_yields_token_batches(debug_assets):
    config = job()
    tokenizer = ts.build_tokenizer(config)
    loader = ts.build_dataloader(dp_world_size=2, dp_rank=1, tokenizer=tokenizer,
                                 job_config=config)
    inputs, labels = next(iter(loader))
    assert inputs["input"].shape == labels.shape == (8, 256)
    assert torch.equal(inputs["input"][:, 1:], labels[:, :-1])
    assert int(labels.max()) < tokenizer.get_vocab_size() <= 2048


def brute_force_mean_keys(kind: str, args, seq_len: int) -> float:
    """Count the attended keys of every query from an explicit mask."""
    t = torch.arange(seq_len)
    if kind == "rat":  # earlier chunks' summaries + own state
        return float((t // args.chunk_size + 1).double().mean())
    causal = t[:, None] >= t[None, :]
    if kind == "swa":
        causal &= t[:, None] - t[None, :] <= args.swa_window
    return float(causal.double().sum(1).mean())


@pytest.mark.parametrize("kind", KINDS)
def test_flops_count_real_mixing_cost(kind):
    args = fresh_args(kind, "1.3B")
    with torch.device("meta"):
        model = RATModel(args)
    for seq_len in (16, 1000, 4096):
        nparams, flops = args.get_nparams_and_flops(model, seq_len)
        assert nparams == len(torch.nn.utils.parameters_to_vector(model.parameters()))
        dense = 6 * (nparams - args.vocab_size * args.dim) + 6 * args.dim * args.vocab_size
        mixing = sum(
            12 * args.n_heads * args.head_dim
            * brute_force_mean_keys(args.layer_mixer(i), args, seq_len)
            + (24 * args.dim if args.layer_mixer(i) == "rat" else 0)
            for i in range(args.n_layers)
        )
        assert flops == pytest.approx(dense + mixing, rel=1e-9)


def test_rat_mixing_is_cheaper_than_attention():
    def mixing(kind):
        args = fresh_args(kind, "1.3B")
        with torch.device("meta"):
            model = RATModel(args)
        nparams, flops = args.get_nparams_and_flops(model, 4096)
        return flops - 6 * nparams
    # ~L times fewer attended keys at T=4096: RAT's mixing is a small fraction of attention's.
    assert mixing("rat") < mixing("rat_attn") / 10


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "train_configs").glob("*.toml")))
def test_shipped_configs_are_valid(config, debug_assets, monkeypatch):
    import torchtitan.components.quantization.float8 as titan_float8

    # The float8 recipe is for SM89+ GPUs: lift torchtitan's GPU check, as the dry run does.
    monkeypatch.setattr(titan_float8, "has_cuda_capability", lambda major, minor: True)
    # The fine-tuning recipes start from pretrained weights that a test does not have.
    job_config = job(config, *(["--checkpoint.initial_load_path="] if "sft" in config else []))
    assert job_config.experimental.custom_import == "rat_plugin.train_spec"
    assert job_config.job.custom_config_module == "rat_plugin.infra.config"
    assert (job_config.rat.scan_kernel, job_config.rat.attention_kernel) == ("auto", "auto")
    spec = get_train_spec(job_config.model.name)
    args = ts.RATTitanArgs(**vars(spec.model_args[job_config.model.flavor]))
    args.update_from_config(job_config)
    assert args.max_seq_len == job_config.training.seq_len
    assert job_config.metrics.enable_tensorboard


# The paper's recipes: pretraining (lr, weight decay, global batch) and fine-tuning (SFT).
PRETRAINING, SFT = (8e-4, 0.1, 512), (1e-5, 0.01, 128)


@pytest.mark.parametrize("config, recipe", [
    ("rat_1p3b.toml", PRETRAINING), ("rat_swa_1p3b.toml", PRETRAINING),
    ("rat_1p3b_float8.toml", PRETRAINING), ("rat_1p3b_sft.toml", SFT),
    ("rat_swa_1p3b_sft.toml", SFT)])
def test_1p3b_configs_follow_the_paper_recipe(config, recipe):
    c = job(config)
    lr, weight_decay, batch = recipe
    assert (c.optimizer.name, c.optimizer.lr, c.optimizer.beta1, c.optimizer.beta2,
            c.optimizer.weight_decay) == ("AdamW", lr, 0.9, 0.95, weight_decay)
    assert c.lr_scheduler.warmup_steps == round(0.05 * c.training.steps)
    assert c.lr_scheduler.decay_type == "cosine"
    assert c.optimizer.lr * c.lr_scheduler.min_lr_factor == pytest.approx(1e-6)
    assert (c.training.global_batch_size, c.training.seq_len, c.training.max_norm) == (
        batch, 4096, 1.0)
    assert c.training.mixed_precision_param == "bfloat16"
    assert c.compile.enable and c.checkpoint.enable
    assert c.activation_checkpoint.mode == "selective"
    assert c.model.flavor == "1.3B"
    assert (c.model.converters == ["quantize.linear.float8"]) == ("float8" in config)
    # trained as decoded: documents never see each other (instruction data always packs so)
    assert c.rat.document_aware or recipe == SFT


def test_prepare_is_deterministic_and_idempotent(tmp_path, debug_assets):
    from rat_plugin.data.prepare import prepare

    assert prepare(tmp_path) is True
    assert prepare(tmp_path) is False
    for rel in ("data/rat_debug/train.jsonl", "data/rat_debug/validation.jsonl",
                "tokenizer/tokenizer.json"):
        assert (tmp_path / rel).read_bytes() == (debug_assets / rel).read_bytes()
    config = json.loads((tmp_path / "tokenizer/tokenizer_config.json").read_text())
    assert config["bos_token"] and config["eos_token"]


def test_fsdp_keeps_tied_weight_in_root_unit(tmp_path):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    from rat_plugin.infra.parallelize import apply_fsdp

    torch.manual_seed(0)
    reference = RATModel(make_args("rat", "debugmodel"))
    reference.init_weights()
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1),
                            rank=0, world_size=1)
    try:
        with torch.device("meta"):
            model = RATModel(make_args("rat", "debugmodel"))
        apply_fsdp(model, init_device_mesh("cpu", (1,)), param_dtype=torch.float32,
                   reduce_dtype=torch.float32)
        model.to_empty(device="cpu")
        with torch.no_grad():
            model.init_weights()
        assert model.output.weight is model.tok_embeddings.weight
        root = model._get_fsdp_state()._fsdp_param_group.fsdp_params
        assert [p.sharded_param for p in root] == [model.tok_embeddings.weight, model.norm.weight]
        set_model_state_dict(model, reference.state_dict(),
                             options=StateDictOptions(full_state_dict=True))
        tokens = torch.randint(0, 2048, (2, 64))
        torch.testing.assert_close(model(tokens), reference(tokens))
        model(tokens).logsumexp(-1).sum().backward()
        reference(tokens).logsumexp(-1).sum().backward()
        torch.testing.assert_close(model.tok_embeddings.weight.grad.full_tensor(),
                                   reference.tok_embeddings.weight.grad)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_entry_point_prints_one_line_error(debug_assets, tmp_path):
    """Through the real entry point (torchtitan's main, single process)."""
    run = subprocess.run(
        [sys.executable, "-m", "rat_plugin.train", "--job.config_file",
         "train_configs/rat_debug.toml", "--model.flavor", "nope",
         "--job.dump_folder", str(tmp_path)],
        cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
        timeout=300,
    )
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].endswith(
        "ConfigError: [model] flavor='nope' is unknown for rat: choose one of "
        "['debugmodel', '1.3B', '7B', '13B']"
    )
