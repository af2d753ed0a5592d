"""Distributed equality harness: N ranks (gloo on CPU, NCCL when N GPUs exist) vs one process.

Every rank builds the same tiny fp32 model from the same seed, applies a parallel plan the way
the plugin's ``parallelize_fn`` does (TP -> CP -> FSDP2/HSDP, meshes from torchtitan's
``ParallelDims``), takes the rank's share of one fixed global batch (batch rows over the data
parallel ranks, then torchtitan's own ``prepare_context_parallel_input`` along the sequence),
and runs a few AdamW steps with the trainer's loss (sum of token losses / global token count).
Rank 0 records the global loss of every step and the full (gathered) gradients of the first
and last step; ``reference`` computes the same on one process.

One launch runs many cases in one process group, which keeps 4-rank runs affordable on 2 cores.
Run as a script, this file is the per-rank worker.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rat_plugin.model.args import make_args
from rat_plugin.model.model import RATModel

SEQ_LEN = 64
GLOBAL_BATCH = 4
STEPS = 3
LR = 1e-3
# AdamW's update g / (|g| + eps) amplifies fp32 reduction-order noise in near-zero gradients
# (eps=1e-8 turns 1e-7 gradient noise into 5e-5 after 2 steps); 1e-6 keeps steps comparable.
EPS = 1e-6


@dataclass(frozen=True)
class Case:
    name: str
    dp_replicate: int = 1
    dp_shard: int = 1
    cp: int = 1
    tp: int = 1
    balancer: str | None = "headtail"  # torchtitan's CP load balancer (None: contiguous)
    loss_parallel: bool = True
    no_exchange: bool = False  # negative control: CP ranks keep their own summaries / halos
    documents: bool = False  # packed documents (document_starts), document-aware masks

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.cp * self.tp


CASES = {
    case.name: case
    for case in (
        Case("fsdp2", dp_shard=2),
        Case("tp2", tp=2),
        Case("cp2-contiguous", cp=2, balancer=None),
        Case("cp2-headtail", cp=2),
        Case("fsdp2xtp2", dp_shard=2, tp=2, loss_parallel=False),
        Case("fsdp2xcp2", dp_shard=2, cp=2),
        Case("tp2xcp2", tp=2, cp=2),
        Case("hsdp2x2", dp_replicate=2, dp_shard=2),
        Case("cp2-headtail-no-exchange", cp=2, no_exchange=True),
        Case("cp2-headtail-documents", cp=2, documents=True),
        Case("tp2-documents", tp=2, documents=True),
    )
}
KINDS = ("rat", "rat_swa")


def model_args(kind: str, **overrides):
    fields = dict(dim=64, n_layers=2, n_heads=4, n_groups=2, ffn_hidden_dim=128, vocab_size=256,
                  max_seq_len=SEQ_LEN)
    if kind == "rat_swa":
        # Layer 1 is SWA. 24 tokens: under cp2-headtail (pieces of 16) a halo spans two pieces.
        fields["swa_window"] = 24
    fields.update(overrides)
    return make_args(kind, "debugmodel", **fields)


def build_model(kind: str, device: torch.device | str = "cpu", **overrides) -> RATModel:
    torch.manual_seed(0)
    with torch.device(device):
        model = RATModel(model_args(kind, **overrides))
        model.init_weights()
    return model


# Packed documents per row (starts, multiples of the chunk size 16): under cp2-headtail (pieces
# of 16 tokens) documents span ranks, and the SWA halo (24 tokens) crosses document starts.
DOCUMENTS = ([0, 16, 48], [0, 32], [0, 48], [0, 16, 32, 48])


def global_batch(seq_len: int = SEQ_LEN) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, 256, (GLOBAL_BATCH, seq_len + 1), generator=gen)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def document_starts() -> torch.Tensor:
    """(GLOBAL_BATCH, SEQ_LEN): the start position of each token's document."""
    starts = torch.zeros(GLOBAL_BATCH, SEQ_LEN, dtype=torch.long)
    for row, docs in enumerate(DOCUMENTS):
        for start in docs:
            starts[row, start:] = start
    return starts


def _grads(model) -> dict[str, torch.Tensor]:
    """Full gradients by parameter name (gathers DTensors: a collective on every rank)."""
    out = {}
    for name, param in model.named_parameters():
        grad = param.grad
        if hasattr(grad, "full_tensor"):
            grad = grad.full_tensor()
        out[name] = grad.detach().float().cpu().clone()
    return out


def reference(kind: str, documents: bool = False) -> dict:
    """The single-process run every case must reproduce."""
    model = build_model(kind)
    optim = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS)
    inputs, labels = global_batch()
    kwargs = dict(document_starts=document_starts()) if documents else {}
    losses, grads = [], []
    for step in range(STEPS):
        optim.zero_grad()
        logits = model(inputs, **kwargs)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
        loss = loss / labels.numel()
        loss.backward()
        losses.append(loss.item())
        if step in (0, STEPS - 1):
            grads.append(_grads(model))
        optim.step()
    return dict(losses=losses, grads=grads)


# ---------------------------------------------------------------- per-rank worker


def _parallel_dims(case: Case, device_type: str):
    from torchtitan.distributed import ParallelDims

    dims = ParallelDims(
        dp_replicate=case.dp_replicate, dp_shard=case.dp_shard, cp=case.cp, tp=case.tp,
        pp=1, ep=1, etp=1, world_size=case.world_size,
    )
    dims.build_mesh()
    return dims


def _parallelize(model, dims, case: Case) -> None:
    """The plugin's order: TP -> CP -> FSDP2 (HSDP on a 2-D mesh)."""
    if dims.tp_enabled:
        from rat_plugin.infra.tensor_parallel import apply_tp

        apply_tp(model, dims.get_mesh("tp"), loss_parallel=case.loss_parallel, enable_float8=False)
    if dims.cp_enabled:
        from rat_plugin.infra.context_parallel import apply_cp

        apply_cp(model, dims.get_mesh("cp"))
    if dims.fsdp_enabled:
        from rat_plugin.infra.parallelize import apply_fsdp

        names = ["dp_replicate", "fsdp"] if dims.dp_replicate_enabled else ["fsdp"]
        apply_fsdp(model, dims.get_mesh(names), param_dtype=torch.float32,
                   reduce_dtype=torch.float32)
        if torch.distributed.get_backend() == "gloo":  # also on GPU hosts running CPU ranks
            from rat_plugin.infra import cpu

            cpu.force_sum_reduction(model)
    if case.no_exchange:
        for block in model.layers.values():
            block.mixer.summary_exchange = block.mixer.halo_attention = None


def _local_batch(dims, case: Case, device, seq_len: int = SEQ_LEN):
    """This rank's rows (batch mesh) and sequence pieces (torchtitan's CP sharding)."""
    inputs, labels = global_batch(seq_len)
    starts = document_starts()
    batch_mesh = dims.get_optional_mesh("batch")
    if batch_mesh is not None:
        rows = GLOBAL_BATCH // batch_mesh.size()
        first = batch_mesh.get_local_rank() * rows
        inputs, labels, starts = (t[first : first + rows] for t in (inputs, labels, starts))
    inputs, labels = inputs.to(device), labels.to(device)
    # As the trainer passes the dataloader's extra inputs: whole rows, not sharded by CP.
    kwargs = dict(document_starts=starts.to(device)) if case.documents else {}
    if dims.cp_enabled:
        from torchtitan.distributed.context_parallel import (
            prepare_context_parallel_input,
        )

        inputs, labels, kwargs = prepare_context_parallel_input(
            inputs, labels, kwargs, dims.get_mesh("cp"), device, case.balancer
        )
    return inputs, labels, kwargs


def run_case(case: Case, kind: str, device) -> dict:
    from torch.distributed.tensor.parallel import loss_parallel

    dims = _parallel_dims(case, device.type)
    model = build_model(kind, device)
    _parallelize(model, dims, case)
    optim = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS)
    inputs, labels, kwargs = _local_batch(dims, case, device)
    use_loss_parallel = dims.tp_enabled and case.loss_parallel
    loss_mesh = dims.get_optional_mesh("loss")
    global_tokens = GLOBAL_BATCH * SEQ_LEN
    losses, grads = [], []
    for step in range(STEPS):
        optim.zero_grad()
        logits = model(inputs, **kwargs)
        with loss_parallel() if use_loss_parallel else torch.enable_grad():
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
            loss = loss / global_tokens
            loss.backward()
        value = loss.full_tensor() if hasattr(loss, "full_tensor") else loss
        value = value.detach().clone()
        if loss_mesh is not None:
            torch.distributed.all_reduce(value, group=loss_mesh.get_group())
        losses.append(value.item())
        if step in (0, STEPS - 1):
            grads.append(_grads(model))
        optim.step()
    return dict(losses=losses, grads=grads)


def error_checks(device) -> dict[str, str]:
    """Plan errors raised with real meshes, on every rank alike, before any collective."""
    errors = {}
    tp_dims = _parallel_dims(CASES["tp2"], device.type)
    try:  # 4 heads over 2 ranks is 2 local heads: not a multiple of G = 4
        _parallelize(build_model("rat", device, n_groups=4), tp_dims, CASES["tp2"])
    except ValueError as e:
        errors["tp-bad-degree"] = str(e)
    case = CASES["cp2-headtail"]
    cp_dims = _parallel_dims(case, device.type)
    model = build_model("rat", device)
    _parallelize(model, cp_dims, case)
    inputs, _, kwargs = _local_batch(cp_dims, case, device, seq_len=96)  # pieces of 24 tokens
    try:
        model(inputs, **kwargs)
    except ValueError as e:
        errors["cp-misaligned"] = str(e)
    return errors


def worker(rank: int, world_size: int, store: str, case_names: list[str], out: str) -> None:
    torch.set_num_threads(1)
    use_gpu = torch.cuda.device_count() >= world_size
    if use_gpu:
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        from rat_plugin.infra import cpu

        cpu.use_cpu()
        device = torch.device("cpu")
    torch.distributed.init_process_group(
        "nccl" if use_gpu else "gloo", init_method=f"file://{store}", rank=rank,
        world_size=world_size,
    )
    results: dict = {"backend": torch.distributed.get_backend()}
    for name in case_names:
        if name == "errors":
            results["errors"] = error_checks(device)
            continue
        case = CASES[name]
        for kind in KINDS:
            start = time.perf_counter()
            results[f"{name}-{kind}"] = run_case(case, kind, device)
            results[f"{name}-{kind}"]["seconds"] = time.perf_counter() - start
    if rank == 0:
        torch.save(results, out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def launch(world_size: int, case_names: list[str], timeout: float = 600.0) -> dict:
    """Run ``case_names`` (CASES keys or "errors") on ``world_size`` new ranks: rank 0's results."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.pt")
        env = dict(os.environ, OMP_NUM_THREADS="1")
        procs = [
            subprocess.Popen(
                [sys.executable, __file__, "--rank", str(rank), "--world-size", str(world_size),
                 "--store", os.path.join(tmp, "store"), "--out", out, *case_names],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )
            for rank in range(world_size)
        ]
        deadline = time.monotonic() + timeout
        try:
            while any(p.poll() is None for p in procs):
                failed = [p for p in procs if p.returncode not in (None, 0)]
                if failed or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        logs = [p.communicate()[0] for p in procs]
        if any(p.returncode != 0 for p in procs):
            failed = [i for i, p in enumerate(procs) if p.returncode not in (0, -9)]
            if not failed:
                raise TimeoutError(f"{world_size} ranks ran past {timeout}s:\n{logs[0][-6000:]}")
            tails = "\n".join(f"--- rank {r}:\n{logs[r][-3000:]}" for r in failed)
            raise RuntimeError(f"ranks {failed} of {world_size} failed:\n{tails}")
        return torch.load(out)


def _main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--store", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("cases", nargs="+")
    a = parser.parse_args()
    try:
        worker(a.rank, a.world_size, a.store, a.cases, a.out)
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)  # do not wait in a collective for ranks that will never come


if __name__ == "__main__":
    _main()
