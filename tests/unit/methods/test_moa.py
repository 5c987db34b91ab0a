"""MoA and the MoE-LoRA baselines against hand-written references: a Llama-family decoder written out
token by token with every expert's gated update, explicit sums over experts, and the Switch formula."""

import functools
import math

import pytest
import torch
from conftest import batch, make_model, randomize
from torch.nn import functional as F

from adamix_ds import load_mixtures, save_mixtures
from adamix_ds.config import ConfigError, MixtureConfig
from adamix_ds.export.mixture_checkpoint import CheckpointMismatch
from adamix_ds.methods.registry import inject_mixtures
from adamix_ds.methods.routed.moa_experts import LoRAExpert, gated_update
from adamix_ds.methods.routed.routed_lora import RoutedLoRA
from adamix_ds.methods.routed.token_router import TokenRouter, load_balancing_loss


def _rms(x, weight, eps):
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x, cos, sin):
    """x (B, T, H, D); cos, sin (B, T, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, :, None] + rotated * sin[:, :, None]


def _linear(module, x):
    return F.linear(x, module.weight, module.bias)


def _gated_projection(experts, w, name, module, inp):
    """W x + g_name(x) * (alpha / r) B A x: a frozen projection plus its gated LoRA expert (if any)."""
    out = _linear(module, inp)
    if name not in experts:
        return out
    e = experts[name]
    return out + w[name] * (e.scaling * inp @ e.lora_A.T @ e.lora_B.T)


def reference_logits(model, moa, ids, gate_override=None):
    """The decoder written out with MoA's gated experts (MoA Sec. 3; LLaMA-Adapter Eq. 6-8 for the prompt)."""
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    eps = config.rms_norm_eps
    x = model.model.embed_tokens(ids)
    b, t = ids.shape
    positions = torch.arange(t)[None].expand(b, t)
    cos, sin = model.model.rotary_emb(x, positions)
    causal = torch.full((t, t), float("-inf")).triu(1)
    for index, (decoder, layer) in enumerate(zip(model.model.layers, moa.layers)):
        attn_mod, experts = decoder.self_attn, layer.experts
        n = _rms(x, decoder.input_layernorm.weight, eps)
        g = torch.sigmoid(n @ layer.router.net.weight.T)
        if layer.router.threshold is not None:
            th = torch.sigmoid(_linear(layer.router.threshold, n)) * layer.router.max_threshold
            g = torch.where(g >= th, g - th, torch.zeros_like(g))
        if gate_override is not None:
            g = gate_override(index, g)
        w = {name: g[..., i:i + 1] for i, name in enumerate(layer.names)}
        proj = functools.partial(_gated_projection, experts, w)
        q = proj("q", attn_mod.q_proj, n).view(b, t, heads, dim)
        k = proj("k", attn_mod.k_proj, n).view(b, t, kv_heads, dim)
        v = proj("v", attn_mod.v_proj, n).view(b, t, kv_heads, dim)
        if hasattr(attn_mod, "q_norm"):
            q, k = _rms(q, attn_mod.q_norm.weight, eps), _rms(k, attn_mod.k_norm.weight, eps)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        groups = heads // kv_heads
        kk, vv = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
        scores = torch.einsum("bthd,bshd->bhts", q, kk) / math.sqrt(dim) + causal
        attn = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), vv)
        if "prompt" in experts:
            p = experts["prompt"]
            kp = _linear(attn_mod.k_proj, p.prompt).view(-1, kv_heads, dim)
            vp = _linear(attn_mod.v_proj, p.prompt).view(-1, kv_heads, dim)
            if hasattr(attn_mod, "k_norm"):
                kp = _rms(kp, attn_mod.k_norm.weight, eps)
            kp, vp = kp.repeat_interleave(groups, dim=1), vp.repeat_interleave(groups, dim=1)
            sp = (torch.einsum("bthd,phd->bthp", q, kp) / math.sqrt(dim)).softmax(-1)
            prompt_out = torch.einsum("bthp,phd->bthd", sp, vp) * p.head_gate[None, None, :, None]
            attn = attn + w["prompt"][..., None] * prompt_out
        attn = attn.reshape(b, t, heads * dim)
        x = x + proj("o", attn_mod.o_proj, attn)
        n2 = _rms(x, decoder.post_attention_layernorm.weight, eps)
        mlp = decoder.mlp
        inter = F.silu(_linear(mlp.gate_proj, n2)) * _linear(mlp.up_proj, n2)
        out = proj("down", mlp.down_proj, inter)
        if "adapter" in experts:
            a = experts["adapter"]
            out = out + w["adapter"] * _linear(a.up, F.silu(_linear(a.down, n2)))
        x = x + out
    return _linear(model.lm_head, _rms(x, model.model.norm.weight, eps))


def _moa(family, method, **options):
    model = make_model(family)
    moa = inject_mixtures(model, MixtureConfig(method=method, **options))
    randomize(moa, scale=0.3)
    return model.eval(), moa


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_soft_moa_equals_the_explicit_sum_of_gated_experts(family):
    model, moa = _moa(family, "moa-soft", router_type="linear")
    ids = batch(rows=2, length=9)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference_logits(model, moa, ids), rtol=1e-4, atol=1e-5)
        # The gates matter: with every gate zero the model is the bare base.
        bare = reference_logits(model, moa, ids, gate_override=lambda i, g: torch.zeros_like(g))
        moa.detach()
        torch.testing.assert_close(model(ids).logits, bare, rtol=1e-4, atol=1e-5)


def test_sparse_moa_equals_soft_with_inactive_gates_zeroed():
    model, sparse = _moa("llama", "moa-sparse")
    ids = batch(rows=3, length=8)
    with torch.no_grad():
        gates = [layer.router(_normed_input(model, sparse, ids, i)) for i, layer in enumerate(sparse.layers)]
        share = torch.cat([g.active.float().flatten() for g in gates]).mean().item()
        assert 0.2 < share < 0.95, share  # some (token, expert) pairs are active, some not
        for g in gates:
            assert torch.equal(g.weights == 0, ~g.active)
        # The dense computation of every expert with the zeroed weights (the soft formula) gives the
        # same logits as the sparse gather/compute/scatter.
        torch.testing.assert_close(model(ids).logits, reference_logits(model, sparse, ids), rtol=1e-4, atol=1e-5)


def _normed_input(model, moa, ids, layer):
    captured = {}

    def keep(module, args, out):
        captured["n"] = out.reshape(-1, out.shape[-1])

    handle = model.model.layers[layer].input_layernorm.register_forward_hook(keep)
    model(ids)
    handle.remove()
    return captured["n"]


def test_gated_update_sparse_path_equals_dense_with_zeroed_weights():
    torch.manual_seed(0)
    expert = LoRAExpert(6, 5, r=3, alpha=6.0)
    torch.nn.init.normal_(expert.lora_B)
    x, weight = torch.randn(10, 6), torch.rand(10)
    active = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1, 1], dtype=torch.bool)
    dense = gated_update(expert, x, weight * active, None)
    torch.testing.assert_close(gated_update(expert, x, weight, active), dense)
    assert torch.equal(gated_update(expert, x, weight, active)[~active], torch.zeros(4, 5))


def test_gate_shapes_and_ranges():
    torch.manual_seed(0)
    x = torch.randn(50, 16) * 3
    sigmoid = TokenRouter(16, 5, "sigmoid", "swiglu")(x)
    assert sigmoid.weights.shape == (50, 5) and sigmoid.active is None
    assert ((sigmoid.weights > 0) & (sigmoid.weights < 1)).all()
    router = TokenRouter(16, 5, "threshold", max_threshold=0.4)
    torch.nn.init.normal_(router.net.weight)
    sparse = router(x)
    threshold = torch.sigmoid(router.threshold(x)) * 0.4
    assert (threshold <= 0.4).all()
    torch.testing.assert_close(sparse.weights, torch.where(sparse.scores >= threshold, sparse.scores - threshold, 0.0))
    assert (sparse.weights >= 0).all() and sparse.active.any() and not sparse.active.all()
    soft = TokenRouter(16, 5, "softmax")(x)
    torch.testing.assert_close(soft.weights.sum(-1), torch.ones(50))
    topk = TokenRouter(16, 5, "topk", top_k=2)(x)
    assert (topk.active.sum(-1) == 2).all() and ((topk.weights > 0) == topk.active).all()
    torch.testing.assert_close(topk.weights.sum(-1), torch.ones(50))


def test_load_balancing_loss_matches_the_switch_formula():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.1, 0.4], [0.2, 0.3, 0.5]])
    active = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 1], [0, 1, 1]], dtype=torch.bool)
    share = [2 / 8, 3 / 8, 3 / 8]  # token-slots per expert over 4 tokens x top-2
    mean_prob = [1.5 / 4, 1.2 / 4, 1.3 / 4]
    expected = 3 * sum(f * p for f, p in zip(share, mean_prob))
    assert load_balancing_loss(probs, active, 2).item() == pytest.approx(expected)
    uniform = torch.full((6, 3), 1 / 3)
    balanced = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 1]] * 2, dtype=torch.bool)
    assert load_balancing_loss(uniform, balanced, 2).item() == pytest.approx(1.0)


@pytest.mark.parametrize("method", ["molora", "hydralora", "topk-lora"])
def test_routed_lora_equals_the_explicit_sum_over_experts(method):
    torch.manual_seed(0)
    gate = {"molora": "softmax", "hydralora": "softmax", "topk-lora": "topk"}[method]
    module = RoutedLoRA(12, 7, r=3, alpha=6.0, num_experts=4, shared_a=method == "hydralora", gate=gate, top_k=2)
    torch.nn.init.normal_(module.lora_B)
    torch.nn.init.normal_(module.router.net.weight)
    x = torch.randn(2, 5, 12)
    out, gates = module(x)
    flat = x.reshape(-1, 12)
    logits = flat @ module.router.net.weight.T
    if gate == "softmax":
        weights = logits.softmax(-1)
    else:
        top = logits.topk(2, dim=-1)
        weights = torch.zeros_like(logits).scatter(-1, top.indices, top.values.softmax(-1))
    expected = torch.zeros(10, 7)
    for m in range(4):
        a = module.lora_A[0 if method == "hydralora" else m]
        expected += weights[:, m:m + 1] * (flat @ a.T @ module.lora_B[m].T)
    torch.testing.assert_close(out.reshape(10, 7), expected * 2.0, rtol=1e-5, atol=1e-6)
    assert module.lora_A.shape[0] == (1 if method == "hydralora" else 4)


def test_the_threshold_network_learns():
    """The reference multiplies the raw gate by a hard mask, so its threshold never trains; here it does."""
    model, moa = _moa("llama", "moa-sparse")
    model.train()
    thresholds = [layer.router.threshold.weight.detach().clone() for layer in moa.layers]
    optimizer = torch.optim.SGD(moa.parameters(), lr=0.1)
    ids = batch(rows=4, length=10)
    for _ in range(3):
        loss = model(ids, labels=ids).loss
        loss.backward()
        grads = [layer.router.threshold.weight.grad for layer in moa.layers]
        assert all(g is not None and g.abs().sum() > 0 for g in grads)
        optimizer.step()
        optimizer.zero_grad()
    for before, layer in zip(thresholds, moa.layers):
        assert not torch.equal(before, layer.router.threshold.weight)


@pytest.mark.parametrize("method", ["moa-soft", "moa-sparse", "molora", "hydralora", "topk-lora"])
def test_save_and_load_round_trip(method, tmp_path):
    model = make_model("qwen3")
    mixtures = inject_mixtures(model, MixtureConfig(method=method, router_type="swiglu"))
    randomize(mixtures)
    ids = batch()
    with torch.no_grad():
        expected = model.eval()(ids).logits
    save_mixtures(mixtures, tmp_path)
    fresh = make_model("qwen3").eval()
    loaded = load_mixtures(fresh, tmp_path, expected=MixtureConfig(method=method, router_type="swiglu"))
    assert type(loaded) is type(mixtures)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, expected)
    with pytest.raises(CheckpointMismatch, match="router_type"):
        load_mixtures(make_model("qwen3"), tmp_path, expected=MixtureConfig(method=method))


def test_configuration_errors_name_the_option():
    with pytest.raises(ConfigError, match="--moa_experts"):
        MixtureConfig(method="moa-sparse", moa_experts="q,v,prompt")
    with pytest.raises(ConfigError, match="--num_experts"):
        MixtureConfig(method="moa-soft", num_experts=4)
    with pytest.raises(ConfigError, match="--top_k"):
        MixtureConfig(method="topk-lora", num_experts=4, top_k=4)
    with pytest.raises(ConfigError, match="--max_threshold"):
        MixtureConfig(method="moa-soft", max_threshold=0.3)
    with pytest.raises(ConfigError, match="Llama-family"):
        inject_mixtures(make_model("gpt2"), MixtureConfig(method="moa-soft"))
    assert MixtureConfig(method="moa-soft", moa_experts="adapter,q").expert_names == ["q", "adapter"]
