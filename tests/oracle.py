"""Independent reference implementations, written straight from docs/design.md with plain loops."""

import math

import torch


def rotate(x: torch.Tensor, position: int, base: float) -> torch.Tensor:
    """Rotate-half RoPE of one vector (..., d) by an integer position, pair by pair."""
    d = x.shape[-1]
    half = d // 2
    out = x.clone()
    for i in range(half):
        theta = position * base ** (-2.0 * i / d)
        c, s = math.cos(theta), math.sin(theta)
        out[..., i] = x[..., i] * c - x[..., i + half] * s
        out[..., i + half] = x[..., i + half] * c + x[..., i] * s
    return out


def rat_mixing_loop(q, k, v, g, chunk_size, rope_base=10000.0):
    """Per-token loop over docs/design.md section 1 steps 3-5. All inputs (B, T, H, d)."""
    _, seq_len, _, d = q.shape
    outs = []
    summaries_k, summaries_v = [], []  # rotated by their chunk index
    k_run = v_run = None
    for t in range(seq_len):
        chunk, offset = divmod(t, chunk_size)
        if offset == 0:
            k_run = torch.zeros_like(k[:, t])
            v_run = torch.zeros_like(v[:, t])
        k_run = g[:, t] * k_run + (1 - g[:, t]) * k[:, t]
        v_run = g[:, t] * v_run + (1 - g[:, t]) * v[:, t]
        q_rot = rotate(q[:, t], chunk, rope_base)
        keys = summaries_k + [rotate(k_run, chunk, rope_base)]
        values = summaries_v + [v_run]
        logits = torch.stack([(q_rot * key).sum(-1) for key in keys], dim=-1) / math.sqrt(d)
        weights = torch.softmax(logits, dim=-1)  # (B, H, n)
        outs.append(sum(weights[..., j, None] * values[j] for j in range(len(keys))))
        if offset == chunk_size - 1:
            summaries_k.append(rotate(k_run, chunk, rope_base))
            summaries_v.append(v_run)
    return torch.stack(outs, dim=1)


def window_attention_loop(q, k, v, window, rope_base=10000.0):
    """Causal softmax attention where token t sees tokens max(0, t - window)..t (window None: all).

    q, k, v (B, T, H, d); RoPE by token position.
    """
    _, seq_len, _, d = q.shape
    outs = []
    keys = [rotate(k[:, s], s, rope_base) for s in range(seq_len)]
    for t in range(seq_len):
        first = 0 if window is None else max(0, t - window)
        q_rot = rotate(q[:, t], t, rope_base)
        logits = torch.stack([(q_rot * keys[s]).sum(-1) for s in range(first, t + 1)], -1)
        weights = torch.softmax(logits / math.sqrt(d), dim=-1)
        outs.append(sum(weights[..., j, None] * v[:, first + j] for j in range(t + 1 - first)))
    return torch.stack(outs, dim=1)


def assert_matches_loop_oracle(mixing, inputs, chunk_size, atol=1e-10):
    """``mixing(*inputs, chunk_size)`` equals ``rat_mixing_loop`` in its values and in the
    gradients of every input (q, k, v, gate, each requiring grad) under a random loss weight."""
    out = mixing(*inputs, chunk_size)
    expected = rat_mixing_loop(*inputs, chunk_size)
    torch.testing.assert_close(out, expected, rtol=0, atol=atol)
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(out.shape, generator=gen, dtype=out.dtype).to(out.device)
    grads = torch.autograd.grad((out * weight).sum(), inputs)
    expected_grads = torch.autograd.grad((expected * weight).sum(), inputs)
    for name, got, want in zip(("q", "k", "v", "forget_gate"), grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=atol, msg=f"grad of {name}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def model_loop(model, tokens: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, V) of a RATModel computed from its weights alone, in their dtype, by the
    loop oracles above (docs/design.md sections 1-2): RAT layers by ``rat_mixing_loop``
    (head h uses query/key group h mod G), SWA and attention layers by
    ``window_attention_loop``, RMSNorm, exact GELU and the tied head written out."""
    args = model.args
    batch, seq_len = tokens.shape
    h = model.tok_embeddings.weight[tokens]
    for i, block in enumerate(model.layers.values()):
        mixer, kind = block.mixer, args.layer_mixer(i)
        u = rms_norm(h, block.mixer_norm.weight, args.norm_eps)

        def heads(linear, n=args.n_heads):
            y = u @ linear.weight.T + (0 if linear.bias is None else linear.bias)
            return y.view(batch, seq_len, n, args.head_dim)

        if kind == "rat":
            group = torch.arange(args.n_heads) % args.n_groups
            q = heads(mixer.wq, args.n_groups)[:, :, group]
            k = heads(mixer.wk, args.n_groups)[:, :, group]
            forget = torch.sigmoid(heads(mixer.wg))
            out = rat_mixing_loop(q, k, heads(mixer.wv), forget, args.chunk_size, args.rope_base)
            out = torch.sigmoid(u @ mixer.wz.weight.T) * out.reshape(batch, seq_len, -1)
        else:
            window = args.swa_window if kind == "swa" else None
            out = window_attention_loop(heads(mixer.wq), heads(mixer.wk), heads(mixer.wv), window,
                                        args.rope_base).reshape(batch, seq_len, -1)
        h = h + out @ mixer.wo.weight.T
        a = rms_norm(h, block.ffn_norm.weight, args.norm_eps) @ block.feed_forward.w1.weight.T
        h = h + (0.5 * a * (1 + torch.erf(a / math.sqrt(2)))) @ block.feed_forward.w2.weight.T
    return rms_norm(h, model.norm.weight, args.norm_eps) @ model.tok_embeddings.weight.T
