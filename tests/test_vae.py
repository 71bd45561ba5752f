"""WanVAE on a tiny random AutoencoderKLWan: shapes, normalisation against raw diffusers calls,
streaming against one full decode, and the original-checkpoint key mapping against diffusers' own
single-file converter."""

import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

from wan.vae import StreamingDecoder, WanVAE

MEAN = [0.3, -0.7, 1.1, 0.05]
STD = [1.5, 0.4, 2.5, 1.0]
TINY = {
    "base_dim": 8,
    "z_dim": 4,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
    "latents_mean": MEAN,
    "latents_std": STD,
}
H = W = 32


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return WanVAE(AutoencoderKLWan(**TINY))


def _video(batch: int, frames: int) -> torch.Tensor:
    return torch.rand(batch, 3, frames, H, W) * 2 - 1


def _latents(batch: int, frames: int) -> torch.Tensor:
    # Normalised latents are ~N(0, 1); spread enough that decoded pixels are not all clamped.
    return torch.randn(batch, frames, 4, H // 8, W // 8)


@pytest.mark.parametrize("frames", [1, 5, 9, 13])
def test_shapes(vae, frames):
    latents = vae.encode(_video(2, frames))
    assert latents.shape == (2, 1 + (frames - 1) // 4, 4, H // 8, W // 8)
    pixels = vae.decode(latents)
    assert pixels.shape == (2, frames, 3, H, W)
    assert pixels.min() >= -1 and pixels.max() <= 1


def test_bad_video_shape_named(vae):
    with pytest.raises(ValueError, match=r"\(1, 3, 8, 32, 32\)"):
        vae.encode(_video(1, 8))


def test_normalisation_against_raw_diffusers(vae):
    video = _video(1, 9)
    with torch.no_grad():
        mu = vae.vae.encode(video).latent_dist.mean  # [B, C, F, h, w]
    ours = vae.encode(video)  # [B, F, C, h, w]
    for c in range(4):
        expected = (mu[:, c] - MEAN[c]) / STD[c]
        torch.testing.assert_close(ours[:, :, c], expected)

    latents = _latents(1, 3)
    raw = torch.stack([latents[:, :, c] * STD[c] + MEAN[c] for c in range(4)], dim=1)
    with torch.no_grad():
        expected_pixels = vae.vae.decode(raw).sample.clamp(-1, 1).permute(0, 2, 1, 3, 4)
    torch.testing.assert_close(vae.decode(latents), expected_pixels)


@pytest.mark.parametrize("split", [[1, 1, 1, 1, 1], [1, 4], [3, 2], [2, 3], [5]])
def test_streaming_equals_full_decode(vae, split):
    latents = _latents(2, sum(split))
    full = vae.decode(latents)
    stream = vae.stream_decoder()
    chunks, start = [], 0
    for f in split:
        chunk = stream.decode(latents[:, start : start + f])
        # First latent frame -> 1 pixel frame, every later one -> 4.
        assert chunk.shape[1] == 4 * f - (3 if start == 0 else 0)
        chunks.append(chunk)
        start += f
        vae.decode(_latents(2, 2))  # a full decode in between must not disturb the stream
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=1e-5)


def test_streaming_reset(vae):
    a, b = _latents(1, 3), _latents(1, 2)
    stream = StreamingDecoder(vae)
    stream.decode(a)
    stream.reset()
    torch.testing.assert_close(
        torch.cat([stream.decode(b[:, :1]), stream.decode(b[:, 1:])], 1), vae.decode(b)
    )
    with pytest.raises(ValueError, match="batch size changed from 1 to 2"):
        stream.decode(_latents(2, 1))


def test_frozen(vae):
    assert all(not p.requires_grad for p in vae.parameters())
    torch.nn.Sequential(vae).train()
    assert not vae.training and not vae.vae.training


# ---------------------------------------------------------------------------------------------- loading


def test_original_mapping_matches_diffusers_converter(vae):
    original = vae.to_original_state_dict()
    # Spot checks of the original layout: flat decoder list of 3 resnets + 1 resampler per stage, the
    # only decoder shortcut on the first resnet of stage 1, (norm, SiLU, conv) heads, conv1/conv2 quant.
    for name in ("conv1.weight", "conv2.bias", "encoder.head.2.weight", "decoder.head.0.gamma",
                 "decoder.upsamples.4.shortcut.weight", "decoder.upsamples.3.time_conv.weight",
                 "decoder.upsamples.14.residual.6.bias", "encoder.downsamples.5.time_conv.weight",
                 "encoder.middle.1.to_qkv.weight", "decoder.middle.2.residual.3.gamma"):  # fmt: skip
        assert name in original, name
    # Independent reference: diffusers' own original->diffusers converter gives back our state dict.
    reference = convert_wan_vae_to_diffusers(dict(original))
    ours = vae.vae.state_dict()
    assert set(reference) == set(ours)
    for key, value in ours.items():
        assert torch.equal(reference[key], value), key


def test_original_round_trip(vae, tmp_path):
    pth = tmp_path / "Wan2.1_VAE_tiny.pth"
    torch.save({k: v.clone() for k, v in vae.to_original_state_dict().items()}, pth)
    loaded = WanVAE.from_original(pth, config=TINY)
    video, latents = _video(1, 5), _latents(1, 2)
    torch.testing.assert_close(loaded.encode(video), vae.encode(video), rtol=0, atol=0)
    torch.testing.assert_close(loaded.decode(latents), vae.decode(latents), rtol=0, atol=0)
    assert all(not p.requires_grad for p in loaded.parameters())


def test_original_bad_keys_named(vae, tmp_path):
    sd = vae.to_original_state_dict()
    sd["decoder.upsamples.99.resample.1.weight"] = sd.pop("decoder.upsamples.11.resample.1.weight")
    del sd["encoder.head.0.gamma"]
    sd["conv2.weight"] = torch.zeros(1)
    pth = tmp_path / "bad_vae.pth"
    torch.save(sd, pth)
    with pytest.raises(ValueError) as err:
        WanVAE.from_original(pth, config=TINY)
    msg = str(err.value)
    for name in ("bad_vae.pth", "decoder.upsamples.99.resample.1.weight", "decoder.upsamples.11.resample.1.weight",
                 "encoder.head.0.gamma", "conv2.weight: got (1,)"):  # fmt: skip
        assert name in msg, name


def test_diffusers_folder(vae, tmp_path):
    vae.vae.save_pretrained(tmp_path / "vae")
    loaded = WanVAE.from_diffusers_folder(tmp_path)
    latents = _latents(1, 2)
    torch.testing.assert_close(loaded.decode(latents), vae.decode(latents), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="vae"):
        WanVAE.from_diffusers_folder(tmp_path / "nowhere")


def test_pyproject_diffusers_minimum_provides_the_streaming_decoder_api():
    # AutoencoderKLWan first shipped in diffusers 0.33.0 and WanDecoder3d.forward(first_chunk=...)
    # in 0.35.0 (the Wan2.2 change); both checked in diffusers' git tags. The declared minimum
    # must be at least that, and the installed diffusers must have the argument we pass.
    import inspect
    import re
    from pathlib import Path

    from diffusers.models.autoencoders.autoencoder_kl_wan import WanDecoder3d

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    major, minor = map(int, re.search(r'"diffusers>=(\d+)\.(\d+)', text).groups())
    assert (major, minor) >= (0, 35)
    assert "first_chunk" in inspect.signature(WanDecoder3d.forward).parameters
