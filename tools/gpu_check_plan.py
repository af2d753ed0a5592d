"""The GPU check's plan: what each stage runs on a given GPU, its estimated seconds, its budget.

Every measurement is a candidate with an estimate: a FLOP / byte model of the work (the GPU's
peak bf16 FLOP/s and memory bandwidth times an efficiency) plus explicit constants for what a
model cannot give: process start, Triton JIT, inductor compiles, the trainer's start. One-time
costs (a process start, a compile) are charged to the first candidate that needs them. Each
stage has a budget (a share of LIMIT_S); its candidates are taken in priority order while their
estimates fit in budget / MARGIN, the others are cut and the plan says why. The constants are
guesses until a GPU run: gpu_check.json records each stage's measured duration beside them.

With a warm inductor / Triton cache (a stage that completed once with the same cache folder)
compiles cost WARM_COMPILE of their cold estimate, so a rerun fits more.

    python3 tools/gpu_check.py --plan --gpu h100
"""

import math
from dataclasses import asdict, dataclass, field, replace

import dry_run

LIMIT_S = 540  # the whole check, wheel install included: 9 of a visit's 15 minutes
RESERVE_S = 10  # the runner's own start, report writes and killing a stage at its budget
MARGIN = 1.1  # a stage's planned estimates fit in budget / MARGIN
WARM_COMPILE = 0.25
STAGES = ("environment", "correctness", "block", "generation", "training")


@dataclass(frozen=True)
class Profile:
    """A target: peak numbers, efficiencies, fixed costs (seconds) and stage budgets."""

    name: str
    gpu: str
    dry: bool
    flops: float  # dense bf16 (dry: fp32) FLOP/s
    bandwidth: float  # memory bytes/s
    memory_gib: float
    budgets: dict  # stage -> seconds, summing to at most LIMIT_S - RESERVE_S
    matmul_eff: float = 0.6
    attention_eff: float = 0.4  # flash / flex kernels
    train_mfu: float = 0.35
    launch_s: float = 15e-6  # one eager kernel launch with its Python dispatch
    start_s: float = 10.0  # python3, import torch and the plugin, CUDA context
    wheel_install_s: float = 15.0
    import_check_s: float = 10.0  # importing torchtitan, datasets, torchao
    pytest_start_s: float = 20.0  # collection and xdist workers
    pytest_workers: int = 8
    triton_jit_s: float = 1.5  # one Triton kernel specialisation
    flex_compile_s: float = 20.0  # inductor: one flex graph, forward + backward
    flex_compile_fwd_s: float = 12.0  # inductor: one flex graph, forward only
    autotune_s: float = 30.0  # triton_autotune: 12 configs x 2 kernels compiled and timed
    trainer_start_s: float = 20.0  # trainer process to its first step (no compile)
    trainer_end_s: float = 5.0
    block_compile_s: dict = field(default_factory=lambda: dict(rat=75.0, attention=40.0,
                                                               swa=60.0))
    loss_compile_s: float = 10.0
    train_local_batch: int = 4
    train_steps: tuple = (30, 15)  # tried in order for each model
    train_warmup_steps: int = 5  # steps left out of tokens/s and MFU (compile, warm-up)


H100 = Profile(
    name="h100", gpu="NVIDIA H100 80GB (SXM)", dry=False, flops=989e12, bandwidth=3.35e12,
    memory_gib=80,
    budgets=dict(environment=40, correctness=100, block=105, generation=60, training=225),
)
PROFILES = {
    "h100": H100,
    "h200": replace(H100, name="h200", gpu="NVIDIA H200 141GB", bandwidth=4.8e12,
                    memory_gib=141),
    # The dry run: every stage on 2 busy CPU cores at toy size (constants measured there).
    "cpu": Profile(
        name="cpu", gpu="CPU (dry run, toy sizes)", dry=True, flops=5e10, bandwidth=1e10,
        memory_gib=8, matmul_eff=0.3, attention_eff=0.2, train_mfu=0.1, launch_s=30e-6,
        start_s=5.0, wheel_install_s=0.0, import_check_s=8.0, pytest_start_s=12.0,
        pytest_workers=1, triton_jit_s=0.0, flex_compile_s=0.0, flex_compile_fwd_s=0.0,
        autotune_s=0.0, trainer_start_s=40.0, trainer_end_s=3.0,
        block_compile_s=dict(rat=0.0, attention=0.0, swa=0.0), loss_compile_s=0.0,
        train_local_batch=2, train_steps=(2,), train_warmup_steps=0,
        budgets=dict(environment=45, correctness=90, block=60, generation=60, training=90),
    ),
}

# Sizes: the paper's on a GPU, toys in the dry run.
BLOCK = {
    False: dict(device="cuda", dim=2048, heads=16, tokens=262144, window=1024,
                train=[4096, 16384, 131072, 8192, 32768, 65536], decode=[4096, 32768, 8192, 16384],
                decode_batch=16, timing=dict(warmup=1, repeats=3, min_case=0.3, max_case=4.0),
                compare_at=16384, compare_mode="train"),
    True: dict(device="cpu", dim=64, heads=2, tokens=512, window=64, train=[128, 256],
               decode=[256], decode_batch=2, timing=dict(warmup=1, repeats=1, min_case=0.0,
                                                         max_case=1.0),
               compare_at=256, compare_mode="prefill"),  # CPU flex has no backward
}
GENERATION = {
    # The paper's protocol (prompt 3072, generate 1024, batch until out of memory) shortened:
    # the batch is the largest whose caches fit cache_gib (no out-of-memory search).
    False: dict(device="cuda", flavor="1.3B", dtype="bf16", prompt=1024, generate=128,
                max_batch=512, cache_gib=32, positions=[4096, 32768], latency_batch=16,
                latency_steps=5),
    True: dict(device="cpu", flavor="debugmodel", dtype="fp32", prompt=32, generate=4,
               max_batch=2, cache_gib=0.01, positions=[64], latency_batch=2, latency_steps=1),
}
GENERATION_ORDER = [("rat", False), ("rat_attn", False), ("rat", True), ("rat_attn", True),
                    ("rat_swa", False), ("rat_attn_swa", False), ("rat_swa", True),
                    ("rat_attn_swa", True)]
# (model, shipped config): the recipes first, each followed by its attention baseline.
TRAINING_ORDER = [("rat", "rat_1p3b.toml"), ("rat_attn", "rat_1p3b.toml"),
                  ("rat_swa", "rat_swa_1p3b.toml"), ("rat_attn_swa", "rat_swa_1p3b.toml")]
TRAIN_DATA = ("--model.hf_assets_path=./assets/tokenizer", "--training.dataset=rat_debug",
              "--training.dataset_path=./assets/data/rat_debug")
TRAIN_OFF = ("--checkpoint.no-enable", "--validation.no-enable", "--metrics.log_freq=1",
             "--metrics.no-enable-tensorboard", "--metrics.disable_color_printing")
# What the correctness stage runs (tests/*.py that ask torch.cuda.is_available()).
CORRECTNESS = dict(jit_variants=60, inductor_graphs=16, run_s=30.0)


@dataclass
class Candidate:
    """One measurement the stage may run: its command and the estimate of its own work."""

    what: str
    command: list[str]
    work: dict  # seconds by cause, its own work
    needs: tuple = ()  # one-time costs (keys of the stage's one-time table) it relies on
    params: dict = field(default_factory=dict)
    fallbacks: list = field(default_factory=list)  # smaller versions, tried when it won't fit


@dataclass
class Item:
    what: str
    command: list[str]
    parts: dict  # seconds by cause
    params: dict

    @property
    def estimate_s(self) -> float:
        return sum(self.parts.values())


@dataclass
class StagePlan:
    name: str
    budget_s: float
    items: list[Item]
    cut: list[dict]

    @property
    def estimate_s(self) -> float:
        return sum(item.estimate_s for item in self.items)


@dataclass
class Plan:
    profile: str
    gpu: str
    dry: bool
    warm: list[str]
    stages: list[StagePlan]

    @property
    def total_budget_s(self) -> float:
        return sum(stage.budget_s for stage in self.stages)

    @property
    def total_estimate_s(self) -> float:
        return sum(stage.estimate_s for stage in self.stages)

    def stage(self, name: str) -> StagePlan:
        return next(stage for stage in self.stages if stage.name == name)

    def to_dict(self) -> dict:
        stages = []
        for stage in self.stages:
            items = [dict(asdict(item), estimate_s=round(item.estimate_s, 1))
                     for item in stage.items]
            stages.append(dict(name=stage.name, budget_s=round(stage.budget_s, 1),
                               estimate_s=round(stage.estimate_s, 1), items=items,
                               cut=stage.cut))
        return dict(profile=self.profile, gpu=self.gpu, dry=self.dry, limit_s=LIMIT_S,
                    margin=MARGIN, warm_caches=self.warm,
                    total_budget_s=round(self.total_budget_s, 1),
                    total_estimate_s=round(self.total_estimate_s, 1), stages=stages)


def fit(candidates: list[Candidate], one_time: dict, budget: float) -> tuple[list, list]:
    """Candidates in order while they fit in budget / MARGIN (the one-time costs they need
    charged to the first that does); the rest cut, with the reason."""
    room, used, paid = budget / MARGIN, 0.0, set()
    items, cut = [], []
    for candidate in candidates:
        for version in [candidate, *candidate.fallbacks]:
            parts = {one_time[key][0]: one_time[key][1] for key in version.needs
                     if key not in paid and one_time[key][1] > 0}
            parts.update({cause: s for cause, s in version.work.items() if s > 0})
            cost = sum(parts.values())
            if used + cost <= room:
                items.append(Item(version.what, version.command,
                                  {k: round(v, 1) for k, v in parts.items()}, version.params))
                used += cost
                paid.update(version.needs)
                break
        else:
            smallest = " at its smallest" if candidate.fallbacks else ""
            cut.append(dict(what=candidate.what, estimate_s=round(cost, 1),
                            reason=f"would not fit: {cost:.0f} s estimated{smallest}, "
                                   f"{room - used:.0f} s left of {budget:.0f} s / {MARGIN} margin"))
    return items, cut


# -- the work of each stage --------------------------------------------------------------


def _compile(profile: Profile, seconds: float, warm: bool) -> float:
    return seconds * (WARM_COMPILE if warm else 1.0)


def environment(profile: Profile, warm: bool):
    one_time = {"start": ("process start", profile.start_s)}
    install = Candidate("install the wheel folder (--no-index --no-deps) into a temporary "
                        "target; GPU, driver, versions; which packages and torch APIs exist", [],
                        {"wheel install": profile.wheel_install_s,
                         "imports": profile.import_check_s}, ("start",))
    return [install], one_time


def correctness(profile: Profile, warm: bool):
    one_time = {"start": ("pytest start and collection", profile.pytest_start_s)}
    if profile.dry:
        work = 5.0  # the CUDA tests are collected and skipped
    else:
        compiles = CORRECTNESS["inductor_graphs"] * _compile(profile, profile.flex_compile_s, warm)
        jit = CORRECTNESS["jit_variants"] * _compile(profile, profile.triton_jit_s, warm)
        work = (compiles + jit + CORRECTNESS["run_s"]) / profile.pytest_workers
    command = ["python3", "-m", "pytest", "-q", "-p", "gpu_check_stages.cuda_tests"]
    if profile.pytest_workers > 1:
        command += ["-n", str(profile.pytest_workers)]
    tests = Candidate("the CUDA tests of tests/ (Triton kernels, compiled flex below and above "
                      "128 tokens, opcheck, CUDA graphs, the decode step, bf16 mixing against "
                      "the portable path), pass / fail / skip per test", command,
                      {f"tests on {profile.pytest_workers} workers": work}, ("start",))
    return [tests], one_time


def _models(kinds, flavor: str) -> dict:
    """The models of ``kinds`` on the meta device (exact parameter counts, no memory)."""
    import torch

    from rat_plugin.model import RATModel, make_args

    with torch.device("meta"):
        return {kind: RATModel(make_args(kind, flavor)) for kind in kinds}


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _mean_keys(kind: str, seq_len: int, chunk_size: int, window: int | None) -> float:
    """Keys a query attends to, on average over a sequence of ``seq_len`` tokens."""
    if kind == "attention":
        return (seq_len + 1) / 2
    if kind == "swa":
        return min(window, seq_len / 2) + 1
    return (seq_len / chunk_size + 1) / 2


def _block_case_s(profile: Profile, mixer_params: int, kind: str, size: dict, seq_len: int,
                  train: bool) -> float:
    """One call of a block: projections and mixing (FLOPs), activations (bytes), launches."""
    passes = 3 if train else 1  # backward = 2 x forward for matmuls
    tokens, dim = size["tokens"], size["dim"]
    keys = _mean_keys(kind, seq_len, 16, size["window"])
    matmul = 2 * passes * mixer_params * tokens / (profile.flops * profile.matmul_eff)
    mixing = (4 * dim * keys * tokens * (3.5 if train else 1)
              / (profile.flops * profile.attention_eff))
    memory = 30 * passes * tokens * dim * 2 / profile.bandwidth
    return matmul + mixing + memory + 60 * passes * profile.launch_s


def _decode_case_s(profile: Profile, mixer_params: int, kind: str, size: dict,
                   position: int) -> float:
    keys = {"attention": position, "swa": min(position, size["window"]),
            "rat": position / 16}[kind]
    read = 2 * mixer_params + size["decode_batch"] * 2 * keys * size["dim"] * 2
    return read / profile.bandwidth + 60 * profile.launch_s


def _timed(call_s: float, timing: dict) -> float:
    """bench._bench_common.time_ms: warm-up, then repeats (more while under min_case)."""
    repeats = max(timing["repeats"], min(50, math.ceil(timing["min_case"] / max(call_s, 1e-6))))
    return min((timing["warmup"] + repeats) * call_s, timing["max_case"] + 2 * call_s) + 0.3


def block(profile: Profile, warm: bool):
    size = BLOCK[profile.dry]
    one_time = {
        "start": ("process start", profile.start_s),
        "flex": ("compile: flex fwd+bwd (RAT summaries, SWA windows), Triton scan",
                 _compile(profile, 2 * profile.flex_compile_s + 2 * profile.triton_jit_s, warm)),
        "flex_bf16": ("compile: flex fwd+bwd in bf16", _compile(profile, profile.flex_compile_s,
                                                                 warm)),
        "autotune": ("triton_autotune: compile and time its configs",
                     _compile(profile, profile.autotune_s, warm)),
    }
    models = _models(["rat", "rat_attn", "rat_attn_swa"], "1.3B")  # D=2048, H=16: the paper's
    scale = (size["dim"] / models["rat"].args.dim) ** 2  # 1 but in the toy dry run
    mixers = {"rat": _params(models["rat"].layers["0"].mixer) * scale,
              "attention": _params(models["rat_attn"].layers["0"].mixer) * scale,
              "swa": _params(models["rat_attn_swa"].layers["1"].mixer) * scale}
    timing = size["timing"]
    base = ["python3", "tools/bench_block.py", "--device", size["device"], "--chunk-sizes", "16",
            "--window", str(size["window"]), "--warmup", str(timing["warmup"]), "--repeats",
            str(timing["repeats"]), "--min-case-seconds", str(timing["min_case"]),
            "--max-case-seconds", str(timing["max_case"])]
    if profile.dry:
        base += ["--dim", str(size["dim"]), "--heads", str(size["heads"]), "--tokens",
                 str(size["tokens"]), "--decode-batch", str(size["decode_batch"])]
    candidates = []
    for seq_len in size["train"]:
        run = sum(_timed(_block_case_s(profile, n, kind, size, seq_len, True), timing)
                  for kind, n in mixers.items())
        candidates.append(Candidate(
            f"block train fwd+bwd T={seq_len}: RAT L=16, attention, SWA({size['window']})",
            base + ["--modes", "train", "--seq-lens", str(seq_len)], {"run": run},
            ("start", "flex"),
            dict(group="sweep")))
    for position in size["decode"]:
        run = sum(_timed(_decode_case_s(profile, n, kind, size, position), timing)
                  for kind, n in mixers.items())
        candidates.append(Candidate(
            f"block decode P={position}, batch {size['decode_batch']}: RAT L=16, attention, "
            f"SWA({size['window']})", base + ["--modes", "decode", "--decode-positions",
                                              str(position)], {"run": run}, ("start",),
            dict(group="sweep")))
    at, mode = size["compare_at"], size["compare_mode"]
    run = _timed(_block_case_s(profile, mixers["rat"], "rat", size, at, mode == "train"), timing)
    for setting, flags, key in (("defaults", [], "flex"),
                                ("flex_bf16", ["--attention-kernel", "flex_bf16"], "flex_bf16"),
                                ("triton_autotune", ["--scan-kernel", "triton_autotune"],
                                 "autotune")):
        candidates.append(Candidate(
            f"block {mode} T={at}, RAT L=16 with {setting}",
            base + ["--modes", mode, "--seq-lens", str(at), "--mixers", "rat_L16", *flags],
            {"run": run}, ("start", key), dict(group="kernels", setting=setting)))
    return candidates, one_time


def _cache_bytes(model, position: int) -> float:
    """Decode cache bytes of one sequence at ``position`` (bf16 slots)."""
    args, total = model.args, 0.0
    for layer_id in range(args.n_layers):
        kind = args.layer_mixer(layer_id)
        held = {"attention": position, "swa": min(position, args.swa_window or position),
                "rat": position / args.chunk_size}[kind]
        total += 2 * held * args.dim * 2
    return total


def _generation_s(profile: Profile, model, size: dict, graph: bool) -> tuple[float, int]:
    """bench_generate for one model: the batch whose caches fit, a warm-up, the timed run,
    the decode latencies."""
    params = _params(model)
    final = size["prompt"] + size["generate"]
    batch = 1
    while batch * 2 <= size["max_batch"] and \
            batch * 2 * _cache_bytes(model, final) <= size["cache_gib"] * 2**30:
        batch *= 2
    launches = 0.0 if graph else model.args.n_layers * 40 * profile.launch_s

    def prefill(tokens):
        return 2 * params * tokens / (profile.flops * profile.matmul_eff)

    def step(b, position):
        read = 2 * params + b * _cache_bytes(model, position)
        return max(launches, read / profile.bandwidth) + 2 * params * b / profile.flops

    capture = 3 * step(batch, size["prompt"]) + 0.3 if graph else 0.0
    run = prefill(batch * size["prompt"]) + (size["generate"] - 1) * step(batch, final) + capture
    warmup = 2 * capture + 0.5
    latency = sum(1.0 + capture + (1 + size["latency_steps"]) * step(size["latency_batch"], p)
                  for p in size["positions"])
    build = 2 * params * 4 / profile.bandwidth + 2.0  # init on the device
    return build + warmup + run + latency, batch


def generation(profile: Profile, warm: bool):
    size = GENERATION[profile.dry]
    one_time = {
        "start": ("process start", profile.start_s),
        "flex_rat": ("compile: flex forward for RAT prefill",
                     _compile(profile, profile.flex_compile_fwd_s, warm)),
        "flex_swa": ("compile: flex forward for SWA prefill",
                     _compile(profile, profile.flex_compile_fwd_s, warm)),
    }
    models = _models(sorted({kind for kind, _ in GENERATION_ORDER}), size["flavor"])
    base = ["python3", "tools/bench_generate.py", "--device", size["device"], "--flavor",
            size["flavor"], "--dtype", size["dtype"], "--prompt", str(size["prompt"]),
            "--generate", str(size["generate"]), "--max-batch", str(size["max_batch"]),
            "--cache-budget-gib", str(size["cache_gib"]), "--positions",
            *map(str, size["positions"]), "--latency-batch", str(size["latency_batch"]),
            "--latency-steps", str(size["latency_steps"])]
    candidates = []
    for kind, graph in GENERATION_ORDER:
        if graph and profile.dry:
            continue  # CUDA graphs need CUDA
        seconds, batch = _generation_s(profile, models[kind], size, graph)
        needs = ("start",) + tuple(f"flex_{m}" for m in ("rat", "swa")
                                   if any(models[kind].args.layer_mixer(i) == m
                                          for i in range(2)))
        candidates.append(Candidate(
            f"generation {kind} ({size['flavor']}, random weights){' CUDA graph' if graph else ''}"
            f": prompt {size['prompt']}, generate {size['generate']}, batch {batch} estimated",
            base + ["--kinds", kind] + (["--cuda-graph"] if graph else []), {"run": seconds}, needs,
            dict(kind=kind, cuda_graph=graph)))
    cut = [] if not profile.dry else [dict(
        what="generation with the CUDA-graph decode step", estimate_s=0.0,
        reason="needs CUDA (dry run)")]
    return candidates, one_time, cut


def _train_flops_per_token(model, seq_len: int) -> float:
    """6 x (non-embedding parameters) + the tied head + attention over the keys seen."""
    args = model.args
    flops = 6 * (_params(model) - model.tok_embeddings.weight.numel()) + 6 * args.dim * \
        args.vocab_size
    for layer_id in range(args.n_layers):
        kind = args.layer_mixer(layer_id)
        flops += 12 * args.dim * _mean_keys(kind, seq_len, args.chunk_size, args.swa_window)
    return flops


def training_command(kind: str, config: str, steps: int, profile: Profile) -> list[str]:
    """The trainer run of one model: the shipped config, overriding only what one GPU (or the
    dry run) needs: batch, steps, no checkpoint or validation, the generated data."""
    ours = [f"--model.name={kind}", f"--job.dump_folder=./outputs/gpu_check/{kind}",
            f"--training.steps={steps}", f"--training.local_batch_size={profile.train_local_batch}",
            f"--training.global_batch_size={profile.train_local_batch}",
            f"--lr_scheduler.warmup_steps={max(1, steps // 10)}", *TRAIN_DATA, *TRAIN_OFF]
    if profile.dry:  # the debug size, portable kernels, eager: what ours does not set
        keys = {option.split("=")[0] for option in ours}
        ours = [o for o in dry_run.SIZE if o.split("=")[0] not in keys] + [
            "--compile.no-enable"] + ours
    return ["python3", "-m", "torchtitan.train", "--job.config_file", f"train_configs/{config}",
            *ours]


def training(profile: Profile, warm: bool):
    one_time = {}
    flavor = "debugmodel" if profile.dry else "1.3B"
    models = _models([kind for kind, _ in TRAINING_ORDER], flavor)
    seq_len = 256 if profile.dry else 4096
    candidates = []
    for kind, config in TRAINING_ORDER:
        model = models[kind]
        layers = {model.args.layer_mixer(i) for i in range(model.args.n_layers)}
        compile_s = _compile(profile, sum(profile.block_compile_s[m] for m in layers)
                             + profile.loss_compile_s, warm)
        step_s = (_train_flops_per_token(model, seq_len) * profile.train_local_batch * seq_len
                  / (profile.flops * profile.train_mfu))
        versions = [Candidate(
            f"train {kind} ({config}, {flavor}) on one {'process' if profile.dry else 'GPU'}: "
            f"{steps} steps of {profile.train_local_batch} x {seq_len} tokens",
            training_command(kind, config, steps, profile),
            {"trainer start": profile.trainer_start_s, "compile: blocks and loss": compile_s,
             f"{steps} steps": steps * step_s, "trainer end": profile.trainer_end_s},
            params=dict(kind=kind, config=config, steps=steps,
                        warmup_steps=min(profile.train_warmup_steps, steps - 1)))
            for steps in profile.train_steps]
        candidates.append(replace(versions[0], fallbacks=versions[1:]))
    return candidates, one_time


PLANNERS = dict(environment=environment, correctness=correctness, block=block,
                generation=generation, training=training)


def make_plan(profile: Profile, scale: float = 1.0, warm: list[str] = ()) -> Plan:
    """The plan for ``profile``: stage budgets (times ``scale``) and what fits in each."""
    stages = []
    for name in STAGES:
        budget = profile.budgets[name] * scale
        candidates, one_time, *extra_cut = PLANNERS[name](profile, name in warm)
        items, cut = fit(candidates, one_time, budget)
        stages.append(StagePlan(name, budget, items, cut + (extra_cut[0] if extra_cut else [])))
    return Plan(profile.name, profile.gpu, profile.dry, list(warm), stages)


def describe(plan: Plan) -> str:
    """The plan as text: per stage what runs (estimate), what was cut, the budget; the total."""
    caches = ", ".join(plan.warm) if plan.warm else "none (cold)"
    lines = [f"GPU check plan for {plan.gpu} (profile {plan.profile}); warm caches: {caches}"]
    for stage in plan.stages:
        lines.append(f"\n{stage.name}: estimate {stage.estimate_s:.0f} s, budget "
                     f"{stage.budget_s:.0f} s")
        for item in stage.items:
            parts = " + ".join(f"{k} {v:g}" for k, v in item.parts.items())
            lines.append(f"  {item.estimate_s:6.1f} s  {item.what}  ({parts})")
        for cut in stage.cut:
            lines.append(f"     cut    {cut['what']}: {cut['reason']}")
    lines.append(f"\ntotal: estimate {plan.total_estimate_s:.0f} s, budgets "
                 f"{plan.total_budget_s:.0f} s + {RESERVE_S} s reserve = "
                 f"{plan.total_budget_s + RESERVE_S:.0f} s (limit {LIMIT_S} s)")
    return "\n".join(lines)
