"""DiT architecture, loading paths (official / EMA / DiffFit / safetensors / diffusers), truncated forward, CFG."""

import argparse
import math

import pytest
import torch
import torch.nn.functional as F
from tiny_dit import share_block0_embedder

from fastdd.models.dit import DiT, dit_config, load_dit_checkpoint, sincos_pos_embed_2d

SMALL = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=4, num_heads=4, num_classes=10)


def randomized(model: torch.nn.Module, seed: int, scale: float = 0.1) -> torch.nn.Module:
    """Adds noise to every trainable parameter (the official init zeroes adaLN and the output layer)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * scale)
    return model.eval()


def small_dit(seed: int = 0, **overrides) -> DiT:
    torch.manual_seed(seed)
    return randomized(DiT(**{**SMALL, **overrides}), seed + 100)


def inputs(batch: int = 2, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=generator)
    t = torch.tensor([10, 700, 0, 999][:batch])
    y = torch.tensor([3, 10, 0, 9][:batch])  # 10 = null class
    return x, t, y


def reference_forward(sd, x, t, y, *, depth, heads, patch, num_blocks=None, freq_shift=0.0, mlp_eps=1e-6):
    """Plain re-statement of the official DiT math from the state dict (explicit softmax attention)."""

    def linear(h, name):
        return h @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]

    def layer_norm(h, eps):
        mean = h.mean(-1, keepdim=True)
        var = ((h - mean) ** 2).mean(-1, keepdim=True)
        return (h - mean) / torch.sqrt(var + eps)

    batch = x.shape[0]
    tokens = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=patch)
    tokens = tokens.flatten(2).transpose(1, 2) + sd["pos_embed"]
    dim = tokens.shape[-1]
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / (half - freq_shift))
    angles = t.float()[:, None] * freqs[None]
    temb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
    temb = linear(F.silu(linear(temb, "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = temb + sd["y_embedder.embedding_table.weight"][y]
    head_dim = dim // heads
    for i in range(depth if num_blocks is None else num_blocks):
        pre = f"blocks.{i}"
        shift1, scale1, gate1, shift2, scale2, gate2 = linear(F.silu(c), f"{pre}.adaLN_modulation.1").chunk(6, dim=1)
        h = layer_norm(tokens, 1e-6) * (1 + scale1[:, None]) + shift1[:, None]
        qkv = linear(h, f"{pre}.attn.qkv") * sd.get(f"{pre}.attn.gamma1", 1.0)
        q, k, v = (part.reshape(batch, -1, heads, head_dim).transpose(1, 2) for part in qkv.split(dim, dim=-1))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim), dim=-1)
        attn = (weights @ v).transpose(1, 2).reshape(batch, -1, dim)
        attn = linear(attn, f"{pre}.attn.proj") * sd.get(f"{pre}.attn.gamma2", 1.0)
        tokens = tokens + gate1[:, None] * attn * sd.get(f"{pre}.gamma1", 1.0)
        h = layer_norm(tokens, mlp_eps) * (1 + scale2[:, None]) + shift2[:, None]
        h = linear(F.gelu(linear(h, f"{pre}.mlp.fc1"), approximate="tanh"), f"{pre}.mlp.fc2")
        tokens = tokens + gate2[:, None] * h * sd.get(f"{pre}.gamma2", 1.0)
    if num_blocks is not None:
        return tokens
    shift, scale = linear(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    out = linear(layer_norm(tokens, 1e-6) * (1 + scale[:, None]) + shift[:, None], "final_layer.linear")
    grid = int(tokens.shape[1] ** 0.5)
    channels = out.shape[-1] // (patch * patch)
    out = out.reshape(batch, grid, grid, patch, patch, channels)
    return torch.einsum("nhwpqc->nchpwq", out).reshape(batch, channels, grid * patch, grid * patch)


def reference_for(model: DiT, x, t, y, **kwargs):
    return reference_forward(
        model.state_dict(), x, t, y, depth=model.depth, heads=model.num_heads, patch=model.patch_size, **kwargs
    )


# ------------------------------------------------------------------------------------ architecture
def test_forward_matches_reference_math():
    model = small_dit()
    x, t, y = inputs()
    with torch.no_grad():
        out = model(x, t, y)
        expected = reference_for(model, x, t, y)
    assert out.shape == (2, 8, 8, 8)
    assert expected.abs().mean() > 0.1  # non-trivial weights
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_float_and_integer_timesteps_agree_and_gradients_reach_input():
    model = small_dit()
    x, t, y = inputs()
    x.requires_grad_(True)
    out_int = model(x, t, y)
    out_float = model(x, t.float(), y)
    torch.testing.assert_close(out_int, out_float)
    (grad,) = torch.autograd.grad(out_int.square().sum(), x)
    assert grad.abs().sum() > 0


def test_pos_embed_matches_diffusers_formula():
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    ours = sincos_pos_embed_2d(64, 4)
    theirs = get_2d_sincos_pos_embed(64, 4, base_size=4).float()
    torch.testing.assert_close(ours, theirs)
    model = DiT(**SMALL)
    assert not model.pos_embed.requires_grad and "pos_embed" in model.state_dict()


def test_official_init_zeroes_modulation_and_output():
    model = DiT(**SMALL)
    assert torch.count_nonzero(model.blocks[0].adaLN_modulation[1].weight) == 0
    assert torch.count_nonzero(model.final_layer.linear.weight) == 0
    x, t, y = inputs()
    assert torch.count_nonzero(model(x, t, y)) == 0
    assert model.y_embedder.embedding_table.weight.shape == (11, 64)
    assert DiT(**SMALL, class_dropout_prob=0.0).y_embedder.embedding_table.weight.shape == (10, 64)


def test_named_variants():
    assert dit_config("DiT-XL/2") == dict(hidden_size=1152, depth=28, num_heads=16, patch_size=2)
    assert dit_config("DiT-S/8") == dict(hidden_size=384, depth=12, num_heads=6, patch_size=8)
    model = DiT.from_name("DiT-S/8", input_size=16, num_classes=3)
    assert (model.hidden_size, model.depth, model.num_heads, model.patch_size) == (384, 12, 6, 8)
    assert model.pos_embed.shape == (1, 4, 384)
    with pytest.raises(ValueError, match="name"):
        dit_config("DiT-M/2")


@pytest.mark.parametrize("name, millions", [("DiT-XL/2", 675), ("DiT-L/2", 458), ("DiT-B/2", 130), ("DiT-S/2", 33)])
def test_variant_parameter_counts_match_paper(name, millions):
    with torch.device("meta"):
        model = DiT.from_name(name)
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - millions) < 1


def test_bad_inputs_raise():
    model = small_dit()
    x, t, y = inputs()
    with pytest.raises(ValueError, match="x"):
        model(x[:, :3], t, y)
    with pytest.raises(ValueError, match="y"):
        model(x, t, y.float())
    with pytest.raises(ValueError, match="block_index"):
        model.forward_features(x, t, y, 4)


# -------------------------------------------------------------------------------- truncated / CFG
@pytest.mark.parametrize("block_index", [0, 2, 3])
def test_forward_features_equals_hooked_block_output(block_index):
    model = small_dit()
    x, t, y = inputs()
    captured = {}
    handle = model.blocks[block_index].register_forward_hook(lambda m, a, out: captured.setdefault("h", out))
    with torch.no_grad():
        model(x, t, y)
        features = model.forward_features(x, t, y, block_index)
    handle.remove()
    assert features.shape == (2, 16, 64)
    torch.testing.assert_close(features, captured["h"], atol=0, rtol=0)
    torch.testing.assert_close(
        features, reference_for(model, x, t, y, num_blocks=block_index + 1), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("cfg_channels", [3, 4])
def test_forward_with_cfg_matches_formula(cfg_channels):
    model = small_dit()
    x, _, _ = inputs(batch=2)
    x = torch.cat([x[:1], x[1:]])  # second half differs: must be ignored
    t = torch.tensor([321, 321])
    y = torch.tensor([4, 10])
    with torch.no_grad():
        out = model.forward_with_cfg(x, t, y, cfg_scale=4.0, cfg_channels=cfg_channels)
        cond = reference_for(model, x[:1], t[:1], y[:1])
        uncond = reference_for(model, x[:1], t[:1], y[1:])
    guided = uncond[:, :cfg_channels] + 4.0 * (cond[:, :cfg_channels] - uncond[:, :cfg_channels])
    torch.testing.assert_close(out[0, :cfg_channels], guided[0], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out[1, :cfg_channels], guided[0], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out[0, cfg_channels:], cond[0, cfg_channels:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, cfg_channels:], uncond[0, cfg_channels:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="x"):
        model.forward_with_cfg(x[:1], t[:1], y[:1], 4.0)


# ---------------------------------------------------------------------------------------- DiffFit
def test_diffit_gammas_placement_ones_and_random():
    plain = small_dit()
    diffit = DiT(**SMALL, diffit=[0, 2])
    missing, unexpected = diffit.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == []
    assert sorted(missing) == sorted(
        f"blocks.{i}.{name}" for i in (0, 2) for name in ("gamma1", "gamma2", "attn.gamma1", "attn.gamma2")
    )
    assert diffit.blocks[0].attn.gamma1.shape == (192,) and diffit.blocks[1].gamma1 is None
    assert diffit.config()["diffit"] == [0, 2] and DiT(**diffit.config()).diffit_blocks == (0, 2)
    diffit.eval()
    x, t, y = inputs()
    with torch.no_grad():
        torch.testing.assert_close(diffit(x, t, y), plain(x, t, y), atol=0, rtol=0)
        generator = torch.Generator().manual_seed(5)
        for name, param in diffit.named_parameters():
            if "gamma" in name:
                param.copy_(1 + 0.5 * torch.randn(param.shape, generator=generator))
        out = diffit(x, t, y)
        assert (out - plain(x, t, y)).abs().max() > 1e-2
        torch.testing.assert_close(out, reference_for(diffit, x, t, y), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("depth", [4, 12, 28])
def test_minimax_checkpoint_gammas_where_its_keys_are(tmp_path, depth):
    """A Minimax-format training checkpoint ({"model", "ema", "opt", "args"}, args an argparse Namespace) as Minimax's
    DiT writes it: gammas in the first 14 blocks whatever the depth (use_gamma = [True] * 14 + [False] * 14), built
    here from a vanilla state dict. It loads strictly, and its forward equals the block description's."""
    vanilla = small_dit(depth=depth).state_dict()
    generator = torch.Generator().manual_seed(depth)
    state = dict(vanilla)
    for block in range(min(depth, 14)):  # Minimax: attn.gamma1 [3D] on qkv, attn.gamma2 [D] on proj, block gammas [D]
        for name, size in (("attn.gamma1", 192), ("attn.gamma2", 64), ("gamma1", 64), ("gamma2", 64)):
            state[f"blocks.{block}.{name}"] = 1 + 0.3 * torch.randn(size, generator=generator)
    opt = {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 1e-4, "params": [0]}]}
    args = argparse.Namespace(model="DiT-XL/2", image_size=256, ckpt_every=1000, results_dir="results")
    torch.save({"model": vanilla, "ema": state, "opt": opt, "args": args}, tmp_path / "0012000.pt")
    loaded = load_dit_checkpoint(tmp_path / "0012000.pt", num_heads=4)  # strict, weights-only
    assert loaded.diffit_blocks == tuple(range(min(depth, 14)))
    x, t, y = inputs()
    with torch.no_grad():
        expected = reference_forward(state, x, t, y, depth=depth, heads=4, patch=2)
        assert (expected - reference_forward(vanilla, x, t, y, depth=depth, heads=4, patch=2)).abs().max() > 1e-2
        torch.testing.assert_close(loaded(x, t, y), expected, atol=1e-5, rtol=1e-5)


def test_default_diffit_follows_minimax():
    assert DiT(**{**SMALL, "depth": 4}, diffit=True).diffit_blocks == (0, 1, 2, 3)
    assert DiT(**{**SMALL, "depth": 28}, diffit=True).diffit_blocks == tuple(range(14))
    with pytest.raises(ValueError, match="block indices"):
        DiT(**SMALL, diffit=[5])


# ---------------------------------------------------------------------------------------- loading
def test_all_loading_paths_agree(tmp_path):
    from safetensors.torch import save_file

    model = small_dit()
    sd = model.state_dict()
    torch.save(sd, tmp_path / "plain.pt")
    torch.save({"ema": sd, "model": {k: torch.zeros_like(v) for k, v in sd.items()}, "steps": 7}, tmp_path / "ema.pt")
    torch.save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "ddp.pt")
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "weights.safetensors")
    x, t, y = inputs()
    with torch.no_grad():
        expected = model(x, t, y)
        for source in ["plain.pt", "ema.pt", "ddp.pt", "weights.safetensors"]:
            loaded = DiT.from_checkpoint(tmp_path / source, num_heads=4)
            assert loaded.config() == model.config()
            torch.testing.assert_close(loaded(x, t, y), expected, atol=0, rtol=0)
        into = DiT(**SMALL)
        load_dit_checkpoint(tmp_path / "plain.pt", model=into)
        torch.testing.assert_close(into(x, t, y), expected, atol=0, rtol=0)


def test_diffit_checkpoint_auto_detected(tmp_path):
    model = small_dit(diffit=True)
    with torch.no_grad():
        model.blocks[1].attn.gamma2.mul_(1.7)
    torch.save({"ema": model.state_dict()}, tmp_path / "minimax.pt")
    loaded = load_dit_checkpoint(tmp_path / "minimax.pt", num_heads=4)
    assert loaded.diffit
    x, t, y = inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y), model(x, t, y), atol=0, rtol=0)


class Unsafe:  # a pickled object a weights-only load must refuse (an argparse Namespace is allowed: Minimax's args)
    pass


def test_pickled_objects_need_explicit_trust(tmp_path):
    model = small_dit()
    torch.save({"ema": model.state_dict(), "args": Unsafe()}, tmp_path / "train.pt")
    with pytest.raises(ValueError, match="train.pt: cannot read checkpoint: it is not a checkpoint of tensors"):
        load_dit_checkpoint(tmp_path / "train.pt", num_heads=4)
    loaded = load_dit_checkpoint(tmp_path / "train.pt", num_heads=4, weights_only=False)
    x, t, y = inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y), model(x, t, y), atol=0, rtol=0)


def test_checkpoint_errors_name_file_and_keys(tmp_path):
    sd = small_dit().state_dict()
    bad_shape = dict(sd)
    bad_shape["blocks.1.mlp.fc1.weight"] = torch.zeros(128, 64)
    torch.save(bad_shape, tmp_path / "bad_shape.pt")
    with pytest.raises(ValueError, match=r"bad_shape\.pt.*blocks\.1\.mlp\.fc1\.weight"):
        load_dit_checkpoint(tmp_path / "bad_shape.pt", model=DiT(**SMALL))
    with pytest.raises(ValueError, match=r"bad_shape\.pt.*shape mismatch"):
        load_dit_checkpoint(tmp_path / "bad_shape.pt", model=DiT(**SMALL), strict=False)

    extra = {**sd, "blocks.0.lora_down.weight": torch.zeros(2, 2)}
    torch.save(extra, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match=r"extra\.pt.*unexpected keys: blocks\.0\.lora_down\.weight"):
        load_dit_checkpoint(tmp_path / "extra.pt", num_heads=4)
    loaded = load_dit_checkpoint(tmp_path / "extra.pt", num_heads=4, strict=False)
    x, t, y = inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y), small_dit()(x, t, y), atol=0, rtol=0)

    missing = {k: v for k, v in sd.items() if k != "blocks.2.attn.proj.bias"}
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match=r"missing\.pt.*missing keys: blocks\.2\.attn\.proj\.bias"):
        load_dit_checkpoint(tmp_path / "missing.pt", num_heads=4)
    partial = load_dit_checkpoint(tmp_path / "missing.pt", num_heads=4, strict=False)
    assert torch.count_nonzero(partial.blocks[2].attn.proj.bias) == 0  # official init, not garbage

    with pytest.raises(ValueError, match="num_heads"):
        load_dit_checkpoint(tmp_path / "missing.pt", strict=False)  # hidden 64 is not a standard variant
    with pytest.raises(ValueError, match="not found"):
        load_dit_checkpoint(tmp_path / "nope.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match=r"list\.pt"):
        load_dit_checkpoint(tmp_path / "list.pt")


def test_infers_learn_sigma_and_class_count():
    model = small_dit(learn_sigma=False, class_dropout_prob=0.0, num_classes=7)
    loaded = load_dit_checkpoint(model.state_dict(), num_heads=4, class_dropout_prob=0.0)
    assert (loaded.out_channels, loaded.num_classes, loaded.learn_sigma) == (4, 7, False)
    loaded = load_dit_checkpoint(model.state_dict(), num_heads=4, num_classes=7)
    assert loaded.class_dropout_prob == 0.0


# -------------------------------------------------------------------------------------- diffusers
def diffusers_dit(seed: int = 3, share_embedders: bool = True):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    model = DiTTransformer2DModel(
        num_attention_heads=4,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_layers=4,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
    )
    randomized(model, seed)
    if share_embedders:  # as in the converted facebook/DiT-XL-2-256 weights
        share_block0_embedder(model)
    return model.eval()


def test_from_diffusers_matches_diffusers_forward(tmp_path):
    theirs = diffusers_dit()
    theirs.save_pretrained(tmp_path / "pipe" / "transformer")
    theirs.save_pretrained(tmp_path / "transformer_only")
    x, t, y = inputs(batch=4)
    with torch.no_grad():
        expected = theirs(x, timestep=t, class_labels=y).sample
        assert expected.abs().mean() > 0.1
        for source in [theirs, tmp_path / "pipe", tmp_path / "transformer_only"]:
            ours = DiT.from_diffusers(source)
            assert (ours.hidden_size, ours.depth, ours.num_classes, ours.out_channels) == (64, 4, 10, 8)
            torch.testing.assert_close(ours(x, t, y), expected, atol=1e-5, rtol=1e-5)


def test_from_diffusers_official_numerics_option():
    theirs = diffusers_dit()
    exact = DiT.from_diffusers(theirs)
    official = DiT.from_diffusers(theirs, match_diffusers_numerics=False)
    sd = official.state_dict()
    for key, value in exact.state_dict().items():
        torch.testing.assert_close(sd[key], value, atol=0, rtol=0)
    x, t, y = inputs()
    with torch.no_grad():
        torch.testing.assert_close(official(x, t, y), reference_for(official, x, t, y), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            exact(x, t, y), reference_for(exact, x, t, y, freq_shift=1.0, mlp_eps=1e-5), atol=1e-5, rtol=1e-5
        )


def test_from_diffusers_rejects_unshared_embedders(tmp_path):
    with pytest.raises(ValueError, match="block 1"):
        DiT.from_diffusers(diffusers_dit(share_embedders=False))
    with pytest.raises(ValueError, match="path_or_model"):
        DiT.from_diffusers(tmp_path / "absent")
