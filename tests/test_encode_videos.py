"""scripts/encode_videos.py on synthetic mp4s and a tiny random Wan VAE (CPU).

Reference: the test decodes the same files with imageio-ffmpeg itself, takes every second frame,
resizes/crops with sizes worked out here by hand, and calls `WanVAE.encode` on the VAE object it saved.
"""

from __future__ import annotations

import json

import imageio_ffmpeg
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan

from scripts import encode_videos
from utils.dataset import LatentLMDBDataset
from utils.lmdb import LMDBReader
from wan.vae import WanVAE

SRC_W, SRC_H, SRC_FRAMES = 64, 48, 12  # written videos (multiples of 16 for the h264 encoder)
H = W = 32  # target pixels
NUM_FRAMES, STRIDE = 5, 2  # 1 + 4k frames, every 2nd: needs 9 decoded frames
# Covering 32x32 from 48x64 scales by 32/48, so 64 -> round(42.67) = 43 wide, cropped from column 5.
RESIZED_W, LEFT = 43, 5
TINY_VAE = {
    "base_dim": 8,
    "z_dim": 4,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
    "latents_mean": [0.3, -0.7, 1.1, 0.05],
    "latents_std": [1.5, 0.4, 2.5, 1.0],
}


def _write_video(path, frames: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(SRC_H // 8, SRC_W // 8, 3)).astype(np.float32)
    writer = imageio_ffmpeg.write_frames(str(path), (SRC_W, SRC_H), fps=16, macro_block_size=16)
    writer.send(None)
    for i in range(frames):
        # smooth moving pattern, so the codec keeps it recognisable
        image = np.kron(np.roll(base, i, axis=1), np.ones((8, 8, 1))) * 0.8 + 25 * i
        writer.send(np.clip(image, 0, 255).astype(np.uint8).tobytes())
    writer.close()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    videos = root / "videos"
    (videos / "sub").mkdir(parents=True)
    for k in range(3):
        _write_video(videos / f"clip{k}.mp4", SRC_FRAMES, seed=k)
    _write_video(videos / "sub" / "short.mp4", 4, seed=9)
    (videos / "garbage.mp4").write_bytes(np.random.default_rng(0).bytes(2048))
    csv = root / "metadata.csv"
    csv.write_text(
        "video,prompt\n"
        "clip0.mp4,a moving pattern\n"
        '"sub/short.mp4","too short, with a comma"\n'
        "garbage.mp4,not a video\n"
        "missing.mp4,no such file\n"
        "clip1.mp4,another pattern\n",
        encoding="utf-8",
    )
    jsonl = root / "metadata.jsonl"
    jsonl.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"video": "clip2.mp4", "prompt": "a third"},
                {"video": "clip0.mp4", "prompt": "a moving pattern"},
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    torch.manual_seed(0)
    vae_module = AutoencoderKLWan(**TINY_VAE)
    vae_module.save_pretrained(root / "wan" / "vae")
    return {"root": root, "videos": videos, "csv": csv, "jsonl": jsonl, "vae": WanVAE(vae_module)}


def _argv(data, metadata, out, *extra):
    return [
        "--video_dir", str(data["videos"]), "--metadata", str(metadata), "--out", str(out),
        "--vae", str(data["root"] / "wan"), "--height", str(H), "--width", str(W),
        "--num_frames", str(NUM_FRAMES), "--frame_stride", str(STRIDE), "--num_workers", "0", *extra,
    ]  # fmt: skip


def _expected_latent(vae: WanVAE, path) -> torch.Tensor:
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    assert tuple(meta["size"]) == (SRC_W, SRC_H)
    frames = [np.frombuffer(f, np.uint8).reshape(SRC_H, SRC_W, 3) for f in reader]
    picked = torch.from_numpy(np.stack(frames[0 : (NUM_FRAMES - 1) * STRIDE + 1 : STRIDE])).float()
    picked = picked.permute(0, 3, 1, 2)  # [T, 3, h, w]
    resized = F.interpolate(picked, size=(H, RESIZED_W), mode="bilinear", antialias=True, align_corners=False)
    pixels = resized[..., :, LEFT : LEFT + W] / 127.5 - 1.0
    return vae.encode(pixels.permute(1, 0, 2, 3)[None])[0]  # [F, C, h, w]


def _rows(out) -> dict[str, tuple[str, torch.Tensor]]:
    """key (video) -> (prompt, latent); fails on a duplicate key."""
    reader, data = LMDBReader(out), LatentLMDBDataset(out)
    rows: dict[str, tuple[str, torch.Tensor]] = {}
    for i in range(len(data)):
        key = reader.key(i)
        assert key not in rows, f"{key} stored twice"
        rows[key] = (data[i]["prompts"], data[i]["clean_latent"])
    reader.close()
    data.reader.close()
    return rows


def test_latents_equal_direct_vae_encode_and_bad_videos_are_skipped(data, tmp_path):
    out = tmp_path / "csv"
    counts = encode_videos.main(_argv(data, data["csv"], out))
    assert counts == {"written": 2, "skipped": 3}  # too short, garbage, missing
    rows = _rows(out)
    assert sorted(rows) == ["clip0.mp4", "clip1.mp4"]
    assert rows["clip0.mp4"][0] == "a moving pattern"
    for video, (_, latent) in rows.items():
        assert latent.shape == (1 + (NUM_FRAMES - 1) // 4, TINY_VAE["z_dim"], H // 8, W // 8)
        expected = _expected_latent(data["vae"], data["videos"] / video)
        torch.testing.assert_close(latent, expected.half().float(), rtol=2e-3, atol=2e-3)


def test_resume_and_a_longer_metadata_file_skip_done_videos(data, tmp_path):
    out = tmp_path / "resume"
    assert encode_videos.main(_argv(data, data["csv"], out))["written"] == 2
    # JSONL lists clip2 (new) and clip0 (done); decode in a worker process this time
    assert encode_videos.main(_argv(data, data["jsonl"], out, "--num_workers", "1")) == {
        "written": 1,
        "skipped": 0,
    }
    assert encode_videos.main(_argv(data, data["jsonl"], out)) == {"written": 0, "skipped": 0}
    rows = _rows(out)
    assert sorted(rows) == ["clip0.mp4", "clip1.mp4", "clip2.mp4"]
    torch.testing.assert_close(
        rows["clip2.mp4"][1], _expected_latent(data["vae"], data["videos"] / "clip2.mp4").half().float(),
        rtol=2e-3, atol=2e-3,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"different settings \(num_frames: 5 there vs 9 now\)"):
        encode_videos.main([*_argv(data, data["csv"], out), "--num_frames", "9"])


def test_metadata_formats_and_errors(data, tmp_path):
    as_json = tmp_path / "meta.json"
    as_json.write_text(json.dumps([{"video": "a.mp4", "prompt": "x"}, {"video": "a.mp4", "prompt": "y"}]))
    assert encode_videos.read_metadata(as_json) == [("a.mp4", "x")]  # first occurrence wins
    assert encode_videos.read_metadata(data["jsonl"]) == [
        ("clip2.mp4", "a third"),
        ("clip0.mp4", "a moving pattern"),
    ]
    assert encode_videos.read_metadata(data["csv"])[1] == ("sub/short.mp4", "too short, with a comma")

    no_prompt = tmp_path / "bad.csv"
    no_prompt.write_text("video,caption\na.mp4,x\n")
    with pytest.raises(
        ValueError, match=r"bad\.csv: CSV header \['video', 'caption'\] lacks column\(s\) \['prompt'\]"
    ):
        encode_videos.read_metadata(no_prompt)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"video": "a.mp4", "prompt": "x"}\n{oops\n')
    with pytest.raises(ValueError, match=r"broken\.jsonl: line 2 is not JSON"):
        encode_videos.read_metadata(broken)
    empty = tmp_path / "empty.csv"
    empty.write_text("video,prompt\n")
    with pytest.raises(ValueError, match=r"empty\.csv: no videos listed"):
        encode_videos.read_metadata(empty)
    text = tmp_path / "x.txt"
    text.write_text("a.mp4 x\n")
    with pytest.raises(ValueError, match=r"unknown metadata format '\.txt'"):
        encode_videos.read_metadata(text)


def test_bad_geometry_is_named(data, tmp_path):
    with pytest.raises(ValueError, match=r"--num_frames 6 must be 1 \+ 4k"):
        encode_videos.main([*_argv(data, data["csv"], tmp_path / "g"), "--num_frames", "6"])
