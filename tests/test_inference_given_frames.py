"""inference.py --image / --video: image-to-video and video continuation on the tiny Wan config and on a
shapes-world network (random weights, the world codec).

References: the given frames pass through the VAE the test builds itself (`toy_vae`, the world codec's
pixel shuffle written out here) after the pixel mapping `x / 127.5 - 1` and a centre crop worked out by
hand; the training side's cache comes from `scripts/encode_videos.py` -> LMDB -> the Self-Forcing
rollout; long continuation runs past the training length; every bad input is one `error:` line.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import imageio_ffmpeg
import numpy as np
import pytest
import torch

import inference
from tests.dist_helpers import free_port, subprocess_env
from wan import WanConfig, WanModel
from wan.toy import toy_vae
from wan.weights import write_self_forcing_pt
from world.network import NETWORK

ROOT = Path(__file__).resolve().parents[1]
TINY = "configs/tiny_dmd.yaml"  # latents 4 x 8 x 8 -> 64 x 64 pixels, blocks of 3, 6 frames
TINY_I2V = "configs/tiny_dmd_i2v.yaml"  # the same with i2v: the image + 2 blocks of 3 (7 frames)
WORLD = "configs/world/dmd.yaml"  # latents 48 x 4 x 4 -> 16 x 16 pixels, blocks of 3, 12 frames
WORLD_PROMPTS = ["a red square moving left fast", "a blue circle moving up slow"]
WRITE_MP4 = inference.write_mp4  # the real writer (tests wrap it to see the pixels)


# ---------------------------------------------------------------------------------------------- helpers


def _image(path: Path, height: int, width: int, seed: int) -> np.ndarray:
    """A smooth random RGB image (uint8 [H, W, 3]) written to `path` (PNG: lossless)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 255, size=(height // 4, width // 4, 3)).astype(np.uint8)
    image = np.kron(coarse, np.ones((4, 4, 1), dtype=np.uint8))
    iio.imwrite(path, image)
    return image


def _lossless_video(path: Path, frames: np.ndarray) -> None:
    """uint8 `[T, H, W, 3]` -> an FFV1 .mkv that decodes back bit for bit."""
    t, h, w, _ = frames.shape
    writer = imageio_ffmpeg.write_frames(
        str(path), (w, h), fps=16, codec="ffv1", pix_fmt_out="bgr0", macro_block_size=1
    )
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(frame).tobytes())
    writer.close()


def _pixels(frames: np.ndarray) -> torch.Tensor:
    """uint8 `[T, H, W, 3]` -> `[3, T, H, W]` in [-1, 1], the VAE's input convention."""
    return torch.from_numpy(frames.copy()).permute(3, 0, 1, 2).float() / 127.5 - 1.0


def _prompts(tmp_path: Path, prompts: list[str]) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(prompts) + "\n")
    return path


def _infer(monkeypatch, tmp_path: Path, args: list[str], out: str = "videos") -> tuple[int, dict]:
    """Run inference.main in this process; returns the exit code and every written video's pixels
    `[T, 3, H, W]` by file name (captured on the way to the mp4 writer)."""
    videos: dict[str, torch.Tensor] = {}

    def capture(path, video, fps):
        videos[Path(path).name] = video.clone()
        WRITE_MP4(path, video, fps)

    monkeypatch.setattr(inference, "write_mp4", capture)
    code = inference.main([*args, "--output_folder", str(tmp_path / out), "--no_warmup"])
    return code, videos


def _world_checkpoint(tmp_path: Path) -> Path:
    """A world generator with random (non-zero-gated) weights, as an upstream-format .pt."""
    g = torch.Generator().manual_seed(5)
    sd = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in WanModel(NETWORK).state_dict().items()}  # fmt: skip
    path = tmp_path / "world.pt"
    write_self_forcing_pt(path, generator=sd)
    return path


# ---------------------------------------------------------------------------------------------- tiny Wan


def test_image_to_video_starts_with_the_image_through_the_vae(monkeypatch, tmp_path):
    image = _image(tmp_path / "cat.png", 64, 64, seed=0)
    prompts = _prompts(tmp_path, ["a cat", "a dog"])
    code, videos = _infer(
        monkeypatch,
        tmp_path,
        ["--config", TINY, "--data_path", str(prompts), "--image", str(tmp_path / "cat.png"),
         "--num_output_frames", "4"],
    )  # fmt: skip
    assert code == 0
    vae = toy_vae()  # what build_vae gives the tiny preset (seeded)
    expected = vae.decode(vae.encode(_pixels(image[None])[None]))[0]  # [1, 3, 64, 64]
    assert sorted(videos) == ["00000-0_a_cat.mp4", "00001-0_a_dog.mp4"]
    for video in videos.values():
        # 1 image latent + 3 generated: 1 + 4 * 3 pixel frames, the first one the image's round trip
        assert video.shape == (13, 3, 64, 64)
        torch.testing.assert_close(video[:1], expected, rtol=0, atol=1e-5)
    for name in videos:
        assert iio.imread(tmp_path / "videos" / name).shape[0] == 13


def _continue_clip(
    monkeypatch, tmp_path: Path, seed: int, extra: list[str]
) -> tuple[np.ndarray, torch.Tensor]:
    """Continue a random 9-frame 64 x 64 clip from its first K = 3 latent frames (= its 1 + 4 * 2 = 9
    pixel frames); returns the clip and the generated video `[T, 3, 64, 64]`."""
    rng = np.random.default_rng(seed)
    frames = np.kron(rng.integers(0, 255, (9, 16, 16, 3)), np.ones((1, 4, 4, 1))).astype(np.uint8)
    _lossless_video(tmp_path / "clip.mkv", frames)
    prompts = _prompts(tmp_path, ["a cat"])
    args = ["--config", TINY, "--data_path", str(prompts), "--video", str(tmp_path / "clip.mkv"),
            "--num_context_frames", "3", *extra]  # fmt: skip
    code, videos = _infer(monkeypatch, tmp_path, args)
    assert code == 0
    [video] = videos.values()
    return frames, video


def test_video_continuation_starts_with_the_given_frames(monkeypatch, tmp_path):
    frames, video = _continue_clip(monkeypatch, tmp_path, 1, ["--num_output_frames", "6"])  # 3 generated
    vae = toy_vae()
    expected = vae.decode(vae.encode(_pixels(frames)[None]))[0]  # [9, 3, 64, 64]
    assert video.shape == (1 + 4 * 5, 3, 64, 64)
    torch.testing.assert_close(video[:9], expected, rtol=0, atol=1e-5)


def test_cached_context_equals_what_the_training_rollout_caches(monkeypatch, tmp_path):
    """The same picture reaches the KV cache the same way through inference.py (image file -> resize ->
    VAE) and through training (video -> encode_videos.py -> LMDB -> i2v rollout)."""
    import pipeline.self_forcing_training as sft
    from model.build import build_objective_from_config, make_dit
    from pipeline import CausalInferencePipeline
    from scripts import encode_videos
    from utils.config import load_config
    from utils.dataset import LatentLMDBDataset
    from wan.toy import toy_dit_state_dict, toy_text_encoder
    from wan.weights import load_dit_weights

    rng = np.random.default_rng(2)
    # 128 x 96 pixels: the image and the video both get scaled to cover 64 x 64 and centre-cropped
    frames = np.kron(rng.integers(0, 255, (5, 32, 24, 3)), np.ones((1, 4, 4, 1))).astype(np.uint8)
    iio.imwrite(tmp_path / "first.png", frames[0])
    (tmp_path / "videos").mkdir()
    _lossless_video(tmp_path / "videos" / "clip.mkv", frames)
    (tmp_path / "meta.csv").write_text("video,prompt\nclip.mkv,a cat\n")
    encode_videos.main(["--video_dir", str(tmp_path / "videos"), "--metadata", str(tmp_path / "meta.csv"),
                        "--out", str(tmp_path / "lmdb"), "--vae", "toy", "--height", "64", "--width", "64",
                        "--num_frames", "5", "--num_workers", "0"])  # fmt: skip
    item = LatentLMDBDataset(tmp_path / "lmdb", with_image_latent=True)[0]

    # inference.py: record the caches its pipeline filled
    caches = {}
    stream = CausalInferencePipeline.stream

    def recording_stream(self, *args, **kwargs):
        yield from stream(self, *args, **kwargs)
        caches["inference"] = self._caches._caches

    monkeypatch.setattr(CausalInferencePipeline, "stream", recording_stream)
    prompts = _prompts(tmp_path, ["a cat"])
    code, _ = _infer(
        monkeypatch,
        tmp_path,
        ["--config", TINY_I2V, "--data_path", str(prompts), "--image", str(tmp_path / "first.png")],
    )  # fmt: skip
    assert code == 0

    # training: the i2v rollout of the DMD objective on the dataset's image latent
    cfg = load_config(ROOT / TINY_I2V)
    generator = make_dit(cfg, "generator")
    load_dit_weights(generator.model, toy_dit_state_dict(generator.model.config))
    scores = make_dit(cfg, "real_score"), make_dit(cfg, "fake_score")  # unused by the rollout
    objective = build_objective_from_config(cfg, generator, *scores, None, torch.float32)
    allocate = sft.allocate_caches

    def recording_allocate(*args, **kwargs):
        caches["training"] = allocate(*args, **kwargs)
        return caches["training"]

    monkeypatch.setattr(sft, "allocate_caches", recording_allocate)
    wcfg = generator.model.config
    embeds = toy_text_encoder(
        text_dim=wcfg.text_dim, text_len=wcfg.text_len
    )  # build_text_encoder's, for tiny
    batch = {"prompt_embeds": embeds(["a cat"])["prompt_embeds"], "image_latent": item["image_latent"][None]}
    with torch.no_grad():
        objective.rollout.run_generator(
            batch, objective.rollout.sample_shared(1, torch.Generator().manual_seed(0))
        )

    tokens = caches["training"].kv.tokens_per_frame  # frame 0 = the image, cached once and never rewritten
    for ours, theirs in zip(caches["inference"].kv.layers, caches["training"].kv.layers, strict=True):
        # the LMDB holds float16 latents: agreement up to that rounding
        torch.testing.assert_close(ours.k[:, :tokens], theirs.k[:, :tokens], rtol=0, atol=2e-3)
        torch.testing.assert_close(ours.v[:, :tokens], theirs.v[:, :tokens], rtol=0, atol=2e-3)
    assert caches["inference"].kv.layers[0].k[:, :tokens].abs().sum() > 0  # the image was cached at all


def test_long_continuation_with_a_rolling_window_runs_past_the_training_length(monkeypatch, tmp_path):
    # 15 latent frames (training: 6) in a window of 6 with the 3 given frames as the sink
    window = ["--num_output_frames", "15", "model_kwargs.local_attn_size=6", "model_kwargs.sink_size=3"]
    frames, video = _continue_clip(monkeypatch, tmp_path, 3, window)
    assert video.shape[0] == 1 + 4 * 14
    vae = toy_vae()
    torch.testing.assert_close(video[:9], vae.decode(vae.encode(_pixels(frames)[None]))[0], rtol=0, atol=1e-5)
    assert torch.isfinite(video).all() and video[9:].std(dim=0).mean() > 0


# ---------------------------------------------------------------------------------------------- the world


def test_world_student_image_and_video_inputs_come_back_exactly(monkeypatch, tmp_path):
    """The world codec is lossless, so the given frames start the video bit for bit; an image wider than
    the 16 x 16 frame is centre-cropped (no scaling needed when its height fits)."""
    from world.render import Clip, Prompt, render

    ckpt = _world_checkpoint(tmp_path)
    clips = [Clip(Prompt.parse(p), shade) for p, shade in zip(WORLD_PROMPTS, (0, 2), strict=True)]
    truth = [((render(c, 12) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy() for c in clips]
    (tmp_path / "images").mkdir()
    for i, frames in enumerate(truth):  # 16 x 32 pictures whose centre is the clip's first frame
        wide = np.concatenate(
            [np.zeros((16, 8, 3), np.uint8), frames[0], np.full((16, 8, 3), 255, np.uint8)], 1
        )
        iio.imwrite(tmp_path / "images" / f"{i}.png", wide)
        _lossless_video(tmp_path / f"clip{i}.mkv", frames)
    (tmp_path / "pairs.jsonl").write_text("".join(f'{{"video": "clip{i}.mkv", "prompt": "{p}"}}\n' for i, p in enumerate(WORLD_PROMPTS)))  # fmt: skip
    prompts = _prompts(tmp_path, WORLD_PROMPTS)
    base = ["--config", WORLD, "--checkpoint", str(ckpt)]

    code, images = _infer(monkeypatch, tmp_path, [*base, "--data_path", str(prompts), "--image",
                                                  str(tmp_path / "images"), "--num_output_frames", "13"], "i2v")  # fmt: skip
    assert code == 0
    code, continued = _infer(monkeypatch, tmp_path, [*base, "--video", str(tmp_path / "pairs.jsonl"),
                                                     "--num_context_frames", "3"], "continue")  # fmt: skip
    assert code == 0
    for i, frames in enumerate(truth):
        given = _pixels(frames).permute(1, 0, 2, 3)  # [12, 3, 16, 16]
        [i2v] = [v for name, v in images.items() if name.startswith(f"{i:05d}")]
        [cont] = [v for name, v in continued.items() if name.startswith(f"{i:05d}")]
        assert i2v.shape == (13, 3, 16, 16) and cont.shape == (12, 3, 16, 16)
        assert torch.equal(i2v[:1], given[:1]) and torch.equal(cont[:3], given[:3])
    assert len(list((tmp_path / "continue").glob("*.mp4"))) == 2


# ---------------------------------------------------------------------------------------------- errors


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (arguments, words the single error line must hold: the file at fault and the rule)."""
    prompts = _prompts(tmp_path, ["a cat", "a dog"])
    _image(tmp_path / "ok.png", 64, 64, seed=0)
    (tmp_path / "broken.png").write_bytes(b"this is not a picture")
    (tmp_path / "empty").mkdir()
    (tmp_path / "one").mkdir()
    _image(tmp_path / "one" / "a.png", 64, 64, seed=1)
    _lossless_video(tmp_path / "short.mkv", np.zeros((3, 64, 64, 3), np.uint8))
    (tmp_path / "garbage.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "nocol.csv").write_text("file,prompt\nok.png,a cat\n")
    (tmp_path / "missing.csv").write_text("image,prompt\nok.png,a cat\ngone.png,a dog\n")
    p = ["--data_path", str(prompts)]
    return {
        "missing image": ([*p, "--image", str(tmp_path / "nope.png")], ["--image", "nope.png", "no such file or folder"]),
        "unreadable image": ([*p, "--image", str(tmp_path / "broken.png"), "--num_output_frames", "7"], ["broken.png", "cannot decode as an image"]),
        "empty folder": ([*p, "--image", str(tmp_path / "empty")], ["empty", "holds no image files"]),
        "folder count": ([*p, "--image", str(tmp_path / "one")], ["one holds 1 image files for 2 prompts", "counts must match"]),
        "video too short": ([*p, "--video", str(tmp_path / "short.mkv"), "--num_context_frames", "3"],
                            ["short.mkv", "has 3 frames", "3 latent frames need its first 9", "1 + 4 x (3 - 1)"]),
        "unreadable video": ([*p, "--video", str(tmp_path / "garbage.mp4"), "--num_context_frames", "3"], ["garbage.mp4", "cannot decode"]),
        "generated not whole blocks": ([*p, "--image", str(tmp_path / "ok.png"), "--num_output_frames", "6"],
                                       ["--num_output_frames 6", "multiple of num_frame_per_block=3", "--num_output_frames 7"]),
        "video without K": ([*p, "--video", str(tmp_path / "short.mkv")], ["--video needs --num_context_frames"]),
        "image and video": ([*p, "--image", str(tmp_path / "ok.png"), "--video", str(tmp_path / "short.mkv"),
                             "--num_context_frames", "1"], ["--image and --video exclude each other"]),
        "metadata column": (["--image", str(tmp_path / "nocol.csv")], ["nocol.csv", "lacks column(s) ['image']"]),
        "metadata file": (["--image", str(tmp_path / "missing.csv")], ["missing.csv", "entry 2 names", "gone.png"]),
        "metadata and prompts": ([*p, "--image", str(tmp_path / "missing.csv")], ["missing.csv", "leave out --data_path"]),
        "no prompts": (["--image", str(tmp_path / "ok.png")], ["--data_path", "required"]),
    }  # fmt: skip


BAD = [
    "missing image",
    "unreadable image",
    "empty folder",
    "folder count",
    "video too short",
    "unreadable video",
    "generated not whole blocks",
    "video without K",
    "image and video",
    "metadata column",
    "metadata file",
    "metadata and prompts",
    "no prompts",
]


@pytest.mark.parametrize("case", BAD)
def test_each_bad_input_is_one_error_naming_the_file_and_the_rule(case, monkeypatch, tmp_path, capsys):
    args, words = _bad_inputs(tmp_path)[case]
    code, videos = _infer(monkeypatch, tmp_path, ["--config", TINY, *args])
    err = capsys.readouterr().err
    assert code == 2 and not videos
    [line] = [line for line in err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in err
    for word in words:
        assert word in line, (word, line)


def test_context_frames_that_do_not_fit_the_block_layout_are_refused(monkeypatch, tmp_path, capsys):
    _lossless_video(tmp_path / "clip.mkv", np.zeros((9, 64, 64, 3), np.uint8))
    prompts = _prompts(tmp_path, ["a cat"])
    base = ["--config", TINY, "--data_path", str(prompts), "--video", str(tmp_path / "clip.mkv")]
    # N = 3: the given frames must be k*3 or 1 + k*3 latent frames; 2 is neither
    assert _infer(monkeypatch, tmp_path, [*base, "--num_context_frames", "2"])[0] == 2
    [line] = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert "--num_context_frames 2" in line and "k*3 or 1 + k*3" in line
    # with independent_first_frame the first frame is a block of its own: 3 given frames do not fit
    code, _ = _infer(
        monkeypatch, tmp_path, [*base, "--num_context_frames", "3", "independent_first_frame=true"]
    )
    [line] = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert code == 2 and "must number 1 + k*3" in line
    # and the given frames must leave something to generate
    assert (
        _infer(monkeypatch, tmp_path, [*base, "--num_context_frames", "3", "--num_output_frames", "3"])[0]
        == 2
    )
    [line] = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert "--num_output_frames 3 must exceed the 3 given latent frame(s)" in line


# ---------------------------------------------------------------------------------------------- torchrun


def test_torchrun_ema_and_lora_with_images_match_one_process(monkeypatch, tmp_path):
    """2 processes split 3 image/prompt pairs and write the same videos as 1 process; the checkpoint is an
    upstream .pt read with --use_ema, with LoRA adapters on top."""
    from utils.lora import LoraWeights, write_peft_adapter
    from wan.toy import toy_dit_state_dict

    tiny = WanConfig.preset("tiny")
    sd = toy_dit_state_dict(tiny)
    write_self_forcing_pt(
        tmp_path / "run.pt", generator=sd, generator_ema={k: v * 0.9 for k, v in sd.items()}
    )
    g = torch.Generator().manual_seed(0)
    lora = {"blocks.0.self_attn.q.lora_A.weight": torch.randn(2, tiny.dim, generator=g),
            "blocks.0.self_attn.q.lora_B.weight": torch.randn(tiny.dim, 2, generator=g)}  # fmt: skip
    write_peft_adapter(LoraWeights(lora, alpha=2.0, rank=2), tmp_path / "lora")
    (tmp_path / "images").mkdir()
    for i in range(3):
        _image(tmp_path / "images" / f"{i}.png", 96, 80, seed=10 + i)
    prompts = _prompts(tmp_path, ["a cat", "a dog", "a car"])
    args = ["--config", TINY, "--checkpoint", str(tmp_path / "run.pt"), "--use_ema", "--lora", str(tmp_path / "lora"),
            "--data_path", str(prompts), "--image", str(tmp_path / "images"), "--num_output_frames", "4"]  # fmt: skip
    code, one = _infer(monkeypatch, tmp_path, args, "one")
    assert code == 0 and len(one) == 3
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
    ]
    proc = subprocess.run([*launcher, "inference.py", *args, "--output_folder", str(tmp_path / "two"), "--no_warmup"],
                          env=subprocess_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(p.name for p in (tmp_path / "two").glob("*.mp4")) == sorted(one)
    for name in one:
        a, b = (
            iio.imread(tmp_path / "one" / name).astype(int),
            iio.imread(tmp_path / "two" / name).astype(int),
        )
        assert np.abs(a - b).max() <= 2, name
