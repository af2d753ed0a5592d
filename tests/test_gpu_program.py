"""The GPU training program, executed on CPU in one process, against the eager portable model.

On CUDA the blocks run the Triton scan custom op and flex_attention with our BlockMasks, wrapped
as the trainer wraps them (``parallelize_rat``: torchtitan's activation checkpointing with our
op save list, then per-block ``torch.compile(fullgraph=True)``). Here the same program runs with
the custom op's CPU body, flex's reference implementation (torch's CPU backward guard lifted)
and the AOTAutograd backend that runs on CPU (aot_eager): the loss and every gradient must equal
the eager portable model's. Tracing ``create_block_mask`` inside a compiled checkpointed block
failed in dynamo ("Attempted to mutate TorchFunctionModeStackVariable"): the AC cases catch that.
"""

import functools

import pytest
import torch
import torch.nn.functional as F
from torch._C import DispatchKey
from torch._higher_order_ops.flex_attention import flex_attention as flex_hop
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts
from torchtitan.config import JobConfig
from torchtitan.distributed import ParallelDims

from rat_plugin.infra.parallelize import parallelize_rat
from rat_plugin.model import RATModel, make_args

pytestmark = [
    pytest.mark.usefixtures("cpu_flex_backward"),
    pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile"),
]

GPU, PORTABLE = ("triton", "flex"), ("torch", "torch")
SEQ_LEN = 256  # two of flex's 128-query blocks; 16 chunk summaries (debug model, L = 16)
AC = {"none": ("none", ""), "full": ("full", ""), "selective-op": ("selective", "op")}


def build(kind: str, kernels: tuple[str, str]) -> RATModel:
    """The debug model (layer 1 is SWA for rat_swa) with the given kernel choice, seeded."""
    args = make_args(kind, "debugmodel", n_layers=2, scan_kernel=kernels[0],
                     attention_kernel=kernels[1])
    torch.manual_seed(0)
    model = RATModel(args)
    model.init_weights()
    return model


def wrapped(model: RATModel, ac: str, compile: bool = True) -> RATModel:
    """``parallelize_rat`` on one process: AC as configured, then per-block compile."""
    job = JobConfig()
    job.activation_checkpoint.mode, job.activation_checkpoint.selective_ac_option = AC[ac]
    job.compile.enable, job.compile.backend = compile, "aot_eager"
    job.compile.components = ["model"]
    dims = ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=1)
    return parallelize_rat(model, dims, job)


def loss_and_grads(model: RATModel, tokens: torch.Tensor):
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    strip = ("_orig_mod.", "_checkpoint_wrapped_module.")
    grads = {}
    for name, param in model.named_parameters():
        for wrapper in strip:
            name = name.replace(wrapper, "")
        grads[name] = param.grad
    return loss.detach(), grads


@pytest.mark.parametrize("ac", list(AC))
@pytest.mark.parametrize("kind", ["rat", "rat_swa"])
def test_compiled_checkpointed_gpu_program_matches_eager_portable(kind, ac):
    tokens = torch.randint(0, 2048, (2, SEQ_LEN + 1), generator=torch.Generator().manual_seed(1))
    want_loss, want = loss_and_grads(build(kind, PORTABLE), tokens)
    got_loss, got = loss_and_grads(wrapped(build(kind, GPU), ac), tokens)
    torch.testing.assert_close(got_loss, want_loss, rtol=0, atol=1e-5)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


COMPUTE_OPS = {  # what a checkpoint policy typically saves: matmuls and attention kernels
    torch.ops.aten.mm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.baddbmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_attention_math.default,
    torch._higher_order_ops.flex_attention,
}


def save_compute(ctx, func, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if func in COMPUTE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def recompute_all(ctx, func, *args, **kwargs):
    return CheckpointPolicy.PREFER_RECOMPUTE


def checkpointed(model: RATModel, policy) -> RATModel:
    for layer_id, block in model.layers.items():
        context = functools.partial(create_selective_checkpoint_contexts, policy)
        model.layers[layer_id] = checkpoint_wrapper(block, context_fn=context)
    return model


@pytest.mark.parametrize("policy", [save_compute, recompute_all])
@pytest.mark.parametrize("kernels", [PORTABLE, GPU], ids=["portable", "gpu"])
def test_any_checkpoint_policy_keeps_the_gradients(kernels, policy):
    """A saved op output that a later op mutates in place comes back mutated at recompute: no op
    of ours may mutate what a policy could save (the blocked chunk attention masked, shifted and
    added into its matmul outputs in place, which changed the gradients under a policy saving
    bmm)."""
    tokens = torch.randint(0, 2048, (2, SEQ_LEN + 1), generator=torch.Generator().manual_seed(2))
    want_loss, want = loss_and_grads(build("rat_swa", kernels), tokens)
    got_loss, got = loss_and_grads(checkpointed(build("rat_swa", kernels), policy), tokens)
    torch.testing.assert_close(got_loss, want_loss, rtol=0, atol=0)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)


@pytest.fixture
def flex_runs(monkeypatch):
    """Every execution of flex_attention's forward (torch's reference implementation on CPU)."""
    runs = []
    kernel = flex_hop.py_kernels[DispatchKey.CompositeExplicitAutograd]

    def counted(*args, **kwargs):
        runs.append(args[0].shape)
        return kernel(*args, **kwargs)

    monkeypatch.setitem(flex_hop.py_kernels, DispatchKey.CompositeExplicitAutograd, counted)
    flex_hop._dispatch_cache.clear()  # the operator caches the kernel it resolved
    yield runs
    flex_hop._dispatch_cache.clear()


def test_selective_op_ac_saves_flex_instead_of_recomputing_it(flex_runs):
    """Our op save list keeps flex's outputs, as torchtitan's llama3 list does: backward does not
    run the attention forward again."""
    model = wrapped(build("rat_swa", GPU), "selective-op", compile=False)
    tokens = torch.randint(0, 2048, (2, SEQ_LEN + 1), generator=torch.Generator().manual_seed(3))
    logits = model(tokens[:, :-1])
    assert len(flex_runs) == 2  # layer 0 RAT (summaries), layer 1 SWA (window 64 < 256)
    F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    assert len(flex_runs) == 2
