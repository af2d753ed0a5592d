"""float8 training numerics on CPU: torchao's Float8Linear (tensorwise scaling, float8 matmuls
run on the CPU) against the same model in fp32. The trainer-level check (torchtitan's converter,
FSDP and CP) is in tests/test_trainer_parallel.py."""

import pytest
import torch
import torch.nn.functional as F
from torchao.float8 import Float8LinearConfig, convert_to_float8_training
from torchao.float8.float8_linear import Float8Linear

from rat_plugin.infra.float8 import float8_module_filter
from rat_plugin.model import RATModel, make_args

pytestmark = pytest.mark.usefixtures("one_thread")


def loss_and_grads(model: RATModel, tokens: torch.Tensor):
    model.zero_grad()
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["rat", "rat_swa"])
def test_float8_model_tracks_the_fp32_model(kind):
    torch.manual_seed(0)
    window = {"swa_window": 32} if kind == "rat_swa" else {}  # else every layer is RAT
    args = make_args(kind, "debugmodel", dim=128, n_layers=2, ffn_hidden_dim=512,
                     vocab_size=512, max_seq_len=128, **window)
    model = RATModel(args)
    model.init_weights()
    reference = RATModel(args)
    reference.load_state_dict(model.state_dict())
    reference.output.weight = reference.tok_embeddings.weight
    convert_to_float8_training(model, config=Float8LinearConfig(),
                               module_filter_fn=float8_module_filter)

    converted = {n for n, m in model.named_modules() if isinstance(m, Float8Linear)}
    linears = {n for n, m in reference.named_modules() if isinstance(m, torch.nn.Linear)}
    kept = {n for n in linears if n == "output" or n.endswith(("mixer.wq", "mixer.wk"))}
    assert converted == linears - kept and converted

    tokens = torch.randint(0, args.vocab_size, (4, 129))
    loss, grads = loss_and_grads(model, tokens)
    want_loss, want_grads = loss_and_grads(reference, tokens)
    # e4m3 keeps 3 mantissa bits: per-element error up to ~6%, averaging out in the loss.
    assert abs(loss - want_loss) < 0.01 * want_loss
    for name, want in want_grads.items():
        cosine = F.cosine_similarity(grads[name].flatten(), want.flatten(), dim=0)
        assert cosine > 0.95, f"{name}: gradient cosine {cosine:.3f} against fp32"
