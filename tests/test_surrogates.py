"""ResNet test nets, VAE / pixel codecs and MTT replay buffers."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parameters_to_vector

from fastdd.models.replay_buffer import check_against_model, load_replay_buffer, select_snapshots, snapshot_to_flat
from fastdd.models.resnet import ResNet, ResNetAP
from fastdd.models.vae import LatentCodec, PixelCodec, load_vae


# ------------------------------------------------------------------------------------------ ResNets
def expected_param_count(channel, classes, width, blocks_per_stage, stem_kernel):
    """Hand count: convs without bias, GroupNorm(C, C) has 2C params, 1x1 shortcut conv where the shape changes."""
    count = channel * width * stem_kernel**2 + 2 * width
    in_ch = width
    for stage, num_blocks in enumerate(blocks_per_stage):
        out_ch = width * 2**stage
        for b in range(num_blocks):
            src = in_ch if b == 0 else out_ch
            count += src * out_ch * 9 + out_ch * out_ch * 9 + 4 * out_ch
            if src != out_ch:
                count += src * out_ch + 2 * out_ch
        in_ch = out_ch
    return count + in_ch * classes + classes


def num_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("im_size, stem_kernel", [(224, 7), (128, 3), (32, 3)])
def test_param_counts(im_size, stem_kernel):
    assert num_params(ResNetAP(3, 10, depth=10, width=64, im_size=im_size)) == expected_param_count(
        3, 10, 64, (1, 1, 1, 1), stem_kernel
    )
    assert num_params(ResNet(3, 100, depth=18, im_size=im_size)) == expected_param_count(
        3, 100, 64, (2, 2, 2, 2), stem_kernel
    )


def stage_shapes(model, x):
    shapes = []
    hooks = [model.stem.register_forward_hook(lambda m, a, out: shapes.append(tuple(out.shape[1:])))]
    hooks += [
        stage.register_forward_hook(lambda m, a, out: shapes.append(tuple(out.shape[1:]))) for stage in model.layers
    ]
    model(x)
    for hook in hooks:
        hook.remove()
    return shapes


def test_resnetap_downsampling_by_average_pooling():
    model = ResNetAP(3, 10, depth=10, width=8, im_size=224)
    assert stage_shapes(model, torch.randn(1, 3, 224, 224)) == [
        (8, 56, 56),
        (8, 56, 56),
        (16, 28, 28),
        (32, 14, 14),
        (64, 7, 7),
    ]
    strides = {m.stride for m in model.modules() if isinstance(m, nn.Conv2d)}
    assert strides == {(1, 1)}
    strided = [m for m in ResNet(3, 10, depth=10, width=8).modules() if isinstance(m, nn.Conv2d) and m.stride != (1, 1)]
    assert len(strided) == 3 and all(m.kernel_size == (1, 1) for m in strided)
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(m.num_groups == m.num_channels and m.affine for m in norms)


def test_resnetap_block_matches_hand_written_math():
    torch.manual_seed(0)
    model = ResNetAP(3, 5, depth=10, width=4, im_size=32)
    block = model.layers[1][0]
    x = torch.randn(2, 4, 8, 8)
    conv1, norm1, conv2, norm2 = block.conv1, block.norm1, block.conv2, block.norm2
    short_conv, short_norm = block.shortcut[0], block.shortcut[2]
    main = F.avg_pool2d(F.relu(F.group_norm(F.conv2d(x, conv1.weight, padding=1), 8, norm1.weight, norm1.bias)), 2)
    main = F.group_norm(F.conv2d(main, conv2.weight, padding=1), 8, norm2.weight, norm2.bias)
    skip = F.group_norm(F.avg_pool2d(F.conv2d(x, short_conv.weight), 2), 8, short_norm.weight, short_norm.bias)
    torch.testing.assert_close(block(x), F.relu(main + skip))


@pytest.mark.parametrize("net", [ResNetAP, ResNet])
@pytest.mark.parametrize("size", [32, 8])
def test_small_images_forward_and_gradients(net, size):
    torch.manual_seed(0)
    model = net(1, 10, width=8, im_size=32)
    images = torch.randn(4, 1, size, size, requires_grad=True)
    logits = model(images)
    assert logits.shape == (4, 10) and torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.arange(4)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert images.grad.abs().sum() > 0
    big_stem = net(1, 10, width=8, im_size=224)  # 7x7 + pool 4 stem on an 8x8 image must not crash
    assert big_stem(torch.randn(2, 1, size, size)).shape == (2, 10)


def test_double_backward_for_gradient_matching():
    """IGD needs d/d(image) of a function of the parameter gradient (create_graph through GroupNorm)."""
    torch.manual_seed(0)
    model = ResNetAP(3, 4, depth=10, width=4, im_size=32).eval()
    images = torch.randn(2, 3, 16, 16, requires_grad=True)
    params = list(model.parameters())
    grads = torch.autograd.grad(F.cross_entropy(model(images), torch.tensor([0, 3])), params, create_graph=True)
    target = torch.randn(sum(p.numel() for p in params))
    loss = 1 - F.cosine_similarity(torch.cat([g.reshape(-1) for g in grads]), target, dim=0)
    (image_grad,) = torch.autograd.grad(loss, images)
    assert torch.isfinite(image_grad).all() and image_grad.abs().sum() > 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="depth"):
        ResNetAP(3, 10, depth=50)
    with pytest.raises(ValueError, match="norm"):
        ResNet(3, 10, norm="layernorm")
    with pytest.raises(ValueError, match="im_size"):
        ResNetAP(3, 10, im_size=0)


# ------------------------------------------------------------------------------------------- codecs
@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )
    folder = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(folder / "plain")
    vae.save_pretrained(folder / "pipeline" / "vae")
    return folder


def test_latent_codec_matches_direct_vae_calls(tiny_vae_dir):
    codec = LatentCodec(load_vae(str(tiny_vae_dir / "plain")))
    vae = codec.vae
    assert (codec.scale, codec.latent_channels, codec.downsample) == (0.18215, 4, 2)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        dist = vae.encode(images).latent_dist
        torch.testing.assert_close(codec.encode(images, sample=False), 0.18215 * dist.mean)
        noise = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(3))
        sampled = codec.encode(images, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(sampled, 0.18215 * (dist.mean + dist.std * noise))
        latents = torch.randn(2, 4, 8, 8) * 0.18215
        decoded = codec.decode(latents)
        assert decoded.shape == (2, 3, 16, 16)
        torch.testing.assert_close(decoded, vae.decode(latents / 0.18215).sample)
        fast = LatentCodec(load_vae(str(tiny_vae_dir / "pipeline")), channels_last=True)
        torch.testing.assert_close(fast.decode(latents), decoded, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            fast.encode(images, sample=False), codec.encode(images, sample=False), atol=1e-5, rtol=1e-5
        )


def test_latent_codec_gradients_and_errors(tiny_vae_dir):
    codec = LatentCodec.from_pretrained(str(tiny_vae_dir / "plain"))
    assert not any(p.requires_grad for p in codec.vae.parameters())
    latents = torch.randn(1, 4, 8, 8, requires_grad=True)
    codec.decode(latents).square().sum().backward()
    assert latents.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="latents"):
        codec.decode(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="images"):
        codec.encode(torch.randn(1, 4, 16, 16))
    with pytest.raises(ValueError, match="cannot load an AutoencoderKL from"):
        load_vae(str(tiny_vae_dir / "absent"))


def test_pixel_codec_is_identity():
    codec = PixelCodec()
    images = torch.rand(2, 3, 8, 8)
    assert codec.encode(images) is images and codec.decode(images) is images
    assert (codec.scale, codec.downsample, codec.latent_channels) == (1.0, 1, 3)
    with pytest.raises(ValueError, match="latents"):
        codec.decode(torch.rand(2, 4, 8, 8))


# ------------------------------------------------------------------------------------ replay buffer
def make_trajectories(model, num_trajectories=2, epochs=4):
    generator = torch.Generator().manual_seed(0)
    buffer, vectors = [], []
    for _ in range(num_trajectories):
        snapshots, flats = [], []
        for _ in range(epochs):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=generator))
            snapshots.append([p.detach().clone() for p in model.parameters()])
            flats.append(parameters_to_vector(model.parameters()).detach().clone())
        buffer.append(snapshots)
        vectors.append(flats)
    return buffer, vectors


def test_replay_buffer_round_trip(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(4, 4), nn.Flatten(), nn.Linear(4, 2))
    buffer, vectors = make_trajectories(model)
    torch.save(buffer, tmp_path / "replay_buffer_0.pt")
    loaded = load_replay_buffer(tmp_path / "replay_buffer_0.pt")
    assert len(loaded) == 2 and len(loaded[0]) == 4
    torch.testing.assert_close(snapshot_to_flat(loaded[1][2]), vectors[1][2], atol=0, rtol=0)
    selected = select_snapshots(loaded, [0, 3, 1], trajectory=1)
    torch.testing.assert_close(selected, torch.stack([vectors[1][0], vectors[1][3], vectors[1][1]]), atol=0, rtol=0)
    check_against_model(selected, model)
    with pytest.raises(ValueError, match="flat"):
        check_against_model(selected, nn.Linear(4, 2))
    with pytest.raises(ValueError, match="epochs"):
        select_snapshots(loaded, [0, 4])
    with pytest.raises(ValueError, match="trajectory"):
        select_snapshots(loaded, [0], trajectory=2)


def test_replay_buffer_validation_names_file(tmp_path):
    model = nn.Linear(3, 2)
    buffer, _ = make_trajectories(model)
    buffer[1][2] = buffer[1][2][:1]
    torch.save(buffer, tmp_path / "replay_buffer_1.pt")
    with pytest.raises(ValueError, match=r"replay_buffer_1\.pt: trajectory 1, snapshot 2"):
        load_replay_buffer(tmp_path / "replay_buffer_1.pt")
    torch.save({"not": "a list"}, tmp_path / "replay_buffer_2.pt")
    with pytest.raises(ValueError, match=r"replay_buffer_2\.pt"):
        load_replay_buffer(tmp_path / "replay_buffer_2.pt")
    with pytest.raises(ValueError, match="not found"):
        load_replay_buffer(tmp_path / "replay_buffer_9.pt")
