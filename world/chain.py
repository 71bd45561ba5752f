"""The whole Self-Forcing recipe on the shapes world, through the project's real entry points.

Stages (each a directory under the run root; a finished stage holds `DONE.json` and is skipped when the
command runs again, an interrupted one resumes from its last checkpoint):

0. data        prompt files (train / held-out) and the training clips as a clean-latent LMDB
1. base        bidirectional world network regressing the exact teacher (train.py, teacher_regression)
   base_eval   the base's own samples (the students' 4-step schedule, a 40-step ODE) and its x0 error
               against the exact teacher: every later stage inherits its quality (with `jobs` > 1 it
               runs beside the distillation stages: nothing reads it before the report)
2. ode_pairs   exact-teacher ODE trajectories (scripts/generate_ode_pairs.py --weights exact)
3. ode         ODE-regression initialisation of the causal student (train.py, ode)
4. sf_dmd      Self-Forcing DMD from the ODE init (train.py, dmd)
   sf_dmd_i2v  the same, image-to-video: every rollout starts from a training clip's first frame
               (full and smoke profiles), from an I2V ODE init: ode_pairs_i2v (13-frame exact
               trajectories), then ode_i2v (ODE regression with the first frame clean, from the ODE init);
               the three run one after the other in one slot beside the other distillation stages
5. baselines   from the same ODE init, the same generator updates: DMD on teacher-forced and on
               diffusion-forced inputs (causvid), Self-Forcing with SiD and with the GAN loss
6. eval        every student with the same 4-step autoregressive inference, at the training length and
               at 3x with a rolling KV window, judged by world.evaluate; then every student (and the
               I2V one) continuing real held-out clips, judged by world.continuation
7. report      report.md, plots, sample strips and mp4s

Every training stage is `torchrun ... train.py --config configs/world/<stage>.yaml`, exactly what a GPU
user runs; the profile only changes step counts and sizes.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "world"

STUDENTS = ("ode", "sf_dmd", "dmd_teacher_forcing", "dmd_diffusion_forcing", "sf_sid", "sf_gan")
LABELS = {
    "data": "data (real clips)",
    "ode": "ODE init",
    "sf_dmd": "Self-Forcing DMD",
    "dmd_teacher_forcing": "DMD, teacher forcing",
    "dmd_diffusion_forcing": "DMD, diffusion forcing (CausVid)",
    "sf_sid": "Self-Forcing SiD",
    "sf_gan": "Self-Forcing GAN",
    "sf_dmd_i2v": "Self-Forcing DMD, image-to-video",
    "ode_i2v": "ODE init, image-to-video",
}
CONFIG_OF = {
    "base": "base",
    "ode": "ode",
    "sf_dmd": "dmd",
    "dmd_teacher_forcing": "dmd_teacher_forcing",
    "dmd_diffusion_forcing": "dmd_diffusion_forcing",
    "sf_sid": "sid",
    "sf_gan": "gan",
    "sf_dmd_i2v": "dmd_i2v",
    "ode_i2v": "ode_i2v",
}


@dataclass(frozen=True)
class Profile:
    """Step counts and sizes of one run of the chain."""

    name: str
    base_steps: int
    pairs_per_prompt: int
    ode_steps: int
    distill_steps: int  # critic steps of every distillation run (generator steps = this / ratio)
    baselines: tuple[str, ...]
    eval_samples: int  # samples per evaluated prompt (held-out split) at the training length
    eval_train_prompts: int  # training prompts evaluated (the same samples per prompt)
    long_samples: int  # 36-frame rollouts per held-out prompt
    ode_sampler_steps: int = 48
    # The base's last steps at a 10x lower LR (base.yaml's lr_min, `lr_schedule: step`): the loss
    # flattens at the constant LR, and the drop sharpens the base (README, "How the recipe was chosen").
    base_low_lr_steps: int = 0
    i2v: bool = False  # train and evaluate the image-to-video stage sf_dmd_i2v (and its ODE init)
    # Steps of the I2V ODE init (fine-tuning the ODE init on 13-frame trajectories, first frame clean)
    # and critic steps of the I2V student from it (None: `distill_steps`, as every other student).
    i2v_ode_steps: int = 300
    i2v_distill_steps: int | None = None
    nproc: int = 1
    # Distillation stages (all start from the ODE init, none reads another) trained side by side, the
    # cores split between them: on 2 cores two one-thread runs of these small networks finish sooner
    # than the same runs one after the other on two threads each (README, "Speed of the chain's steps").
    jobs: int = 1
    overrides: dict[str, list[str]] = field(default_factory=dict)
    # The world whose objects start anywhere along their path (world.render): its data, its exact
    # teacher, networks without absolute frame rows (RoPE alone tells frames apart) and long rollouts
    # in a rolling window without a sink (RANDOM_START_OVERRIDES, RANDOM_START_LONG_WINDOW).
    random_start: bool = False

    def __post_init__(self) -> None:
        if self.jobs < 1:
            raise ValueError(f"jobs must be >= 1, got {self.jobs}")
        for name in ("i2v_ode_steps", "i2v_distill_steps"):
            if (value := getattr(self, name)) is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 (i2v_distill_steps: or None), got {value}")
        if not 0 <= self.base_low_lr_steps < self.base_steps:
            raise ValueError(
                f"base_low_lr_steps={self.base_low_lr_steps} must be in [0, base_steps={self.base_steps})"
            )


DMD_STAGES = ("sf_dmd", "dmd_teacher_forcing", "dmd_diffusion_forcing")  # not the I2V stage: see below
DMD_CRITIC_KEEPS_UP = ("dfake_gen_update_ratio=10", "lr=5e-5")

PROFILES = {
    "smoke": Profile(
        "smoke", base_steps=20, pairs_per_prompt=1, ode_steps=10, distill_steps=10,
        baselines=("dmd_teacher_forcing", "dmd_diffusion_forcing", "sf_sid", "sf_gan"),
        eval_samples=2, eval_train_prompts=2, long_samples=1, ode_sampler_steps=8, i2v=True, i2v_ode_steps=10,
    ),
    "quick": Profile(
        "quick", base_steps=760, pairs_per_prompt=8, ode_steps=300, distill_steps=250,
        baselines=("dmd_teacher_forcing", "dmd_diffusion_forcing"),
        eval_samples=12, eval_train_prompts=8, long_samples=4, jobs=2,
    ),
    "full": Profile(
        "full", base_steps=4000, pairs_per_prompt=38, ode_steps=1000, distill_steps=800,
        baselines=("dmd_teacher_forcing", "dmd_diffusion_forcing", "sf_sid", "sf_gan"),
        eval_samples=16, eval_train_prompts=8, long_samples=6, i2v=True, jobs=2,
        # the I2V ODE init alone already continues every held-out clip (accuracy 1.00), so half the
        # steps of both I2V stages keep it (150 + 400: accuracy 1.00, RMSE 0.029 against 0.028 at
        # 300 + 800) and take ~5 min less of its slot (README, "Image-to-video").
        i2v_ode_steps=150, i2v_distill_steps=400,
        # not 3000 + 500 at a tenth of the LR (--base_low_lr_steps 500): 3 min less and the base's
        # targets met, but its ODE init and students less coherent (Self-Forcing DMD 0.85 against 0.93;
        # README, "A base 500 steps shorter").
        # at 800 critic steps on the 4000-step base, DMD's critic fell behind and Self-Forcing DMD
        # collapsed onto one shade (140/12/8); ten critic steps per generator step at half the LR kept
        # the shades (README, "Distillation knobs"). Self-Forcing DMD and its DMD baselines get it alike
        # (the same generator updates). The I2V stage is given its shade (nothing to collapse) and with
        # these settings lost its continuation accuracy (0.29 -> 0.00): it keeps the shipped ones.
        overrides={stage: list(DMD_CRITIC_KEEPS_UP) for stage in DMD_STAGES},
    ),
}  # fmt: skip

TRAIN_FRAMES = 12
I2V_FRAMES = TRAIN_FRAMES + 1  # the image + 4 blocks of 3 (configs/world/dmd_i2v.yaml)
LONG_FRAMES = 36
# Long rollouts: a rolling KV window of 12 frames whose first block (3 frames) is a sink.
# (A student trained with its own window, `model_kwargs.local_attn_size`, rolls out with that window.)
LONG_WINDOW = ("model_kwargs.local_attn_size=12", "model_kwargs.sink_size=3")
# With random starts nothing but the earlier frames places the object, so a network needs no absolute
# frame index, and without one a rolling window past the training length only shows it frame offsets
# it was trained on (<= 11). A sink would not: its offsets grow with the rollout.
RANDOM_START_OVERRIDES = (
    "real_score_model.random_start=true",
    "generator_model.pos_embed_frame_rows=false",
    "fake_score_model.pos_embed_frame_rows=false",
)
RANDOM_START_LONG_WINDOW = ("model_kwargs.local_attn_size=12", "model_kwargs.sink_size=0")
CENTRE_START_WORLD = (
    "every object starts at the centre; networks with sin/cos frame rows; past 12 frames a rolling "
    "window of 12 frames whose first block (3 frames) is a sink"
)
RANDOM_START_WORLD = (
    "random starts: every object starts at one of 8 positions along its path (24 clips per prompt); "
    "networks without frame rows (RoPE alone orders frames); past 12 frames a rolling window of 12 "
    "frames without a sink"
)
# Seconds each side-by-side stage took in the full profile's fresh run at 2f68170, beside another on
# one thread (README, "Measured: the full profile"; sf_dmd_i2v: its slot, I2V ODE pairs 24 + I2V ODE
# init 93 + I2V student 217). The pool starts them longest first, so the last two end close together
# instead of one core waiting on a long stage started last.
SIDE_BY_SIDE_SECONDS = {
    "sf_gan": 434, "sf_dmd": 337, "sf_dmd_i2v": 334, "sf_sid": 320,
    "dmd_teacher_forcing": 211, "dmd_diffusion_forcing": 172, "base_eval": 85,
}  # fmt: skip
BASE_ODE_STEPS = 40  # the base's many-step samples: Euler steps of its probability-flow ODE
X0_TIMESTEPS = (200, 500, 800)  # where the base's x0 prediction is compared with the exact teacher's


def load_student_config(stage: str):
    from utils.config import load_config

    return load_config(str(CONFIGS / f"{CONFIG_OF[stage]}.yaml"))


def few_step_overrides(cfg) -> list[str]:
    """Overrides that give another config this one's few-step schedule."""
    steps = ",".join(str(s) for s in cfg.denoising_step_list)
    return [f"denoising_step_list=[{steps}]", f"warp_denoising_step={str(cfg.warp_denoising_step).lower()}"]


def _thread_share(processes: int) -> int:
    """Threads for each of `processes` processes sharing this machine's cores (at least one)."""
    return max(1, (os.cpu_count() or 2) // processes)


@contextmanager
def _torch_threads(jobs: int):
    """This process's torch threads while `jobs` stages share the cores (its in-process evaluation
    beside training subprocesses), as `_env` gives each subprocess; an OMP_NUM_THREADS set is kept."""
    before = torch.get_num_threads()
    if jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(_thread_share(jobs))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _say(message: str) -> None:
    print(message, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(nproc: int, jobs: int = 1) -> dict[str, str]:
    """A stage's environment: the cores shared out between its `nproc` processes and the `jobs` stages
    running beside it (an OMP_NUM_THREADS already set is kept)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", str(_thread_share(nproc * jobs)))
    env.setdefault("WANDB_MODE", "disabled")
    return env


class Chain:
    def __init__(self, root: str | os.PathLike, profile: Profile) -> None:
        self.root = Path(root)
        self.profile = profile
        self.root.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ bookkeeping
    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def done(self, stage: str) -> bool:
        return (self.stage_dir(stage) / "DONE.json").is_file()

    def wall_time(self, stage: str) -> float | None:
        path = self.stage_dir(stage) / "DONE.json"
        return json.loads(path.read_text())["seconds"] if path.is_file() else None

    def _run_stage(self, stage: str, what: str, fn: Callable[[], None]) -> None:
        if self.done(stage):
            _say(f"[{stage}] done already ({self.wall_time(stage):.0f} s), skipped")
            return
        _say(f"[{stage}] {what}")
        self.stage_dir(stage).mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
        (self.stage_dir(stage) / "DONE.json").write_text(json.dumps({"seconds": seconds}))
        _say(f"[{stage}] finished in {seconds:.0f} s")

    def _subprocess(self, stage: str, cmd: list[str], total_steps: int | None = None, jobs: int = 1) -> None:
        """Run one job, its output to `<stage>/log.txt`; a progress bar follows its metrics.jsonl (not
        when `jobs` stages run side by side: their bars would overwrite each other)."""
        from tqdm import tqdm

        log = self.stage_dir(stage) / "log.txt"
        metrics = self.stage_dir(stage) / "metrics.jsonl"
        with open(log, "a", encoding="utf-8") as out:
            proc = subprocess.Popen(cmd, cwd=REPO, env=_env(self.profile.nproc, jobs), stdout=out, stderr=out)
            bar = (
                tqdm(total=total_steps, desc=stage, unit="step", dynamic_ncols=True)
                if total_steps and jobs == 1
                else None
            )
            while proc.poll() is None:
                time.sleep(1.0)
                if bar is not None and metrics.is_file():
                    with open(metrics, encoding="utf-8") as f:
                        lines = f.read().splitlines()
                    if lines:
                        bar.n = min(total_steps, json.loads(lines[-1]).get("step", 0))
                        bar.refresh()
            if bar is not None:
                bar.n = bar.n if proc.returncode else total_steps
                bar.close()
        if proc.returncode != 0:
            tail = "".join(log.read_text(encoding="utf-8", errors="replace").splitlines(True)[-25:])
            raise RuntimeError(f"stage {stage} failed (exit {proc.returncode}); end of {log}:\n{tail}")

    def _torchrun(self, script: str, args: list[str]) -> list[str]:
        return [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(self.profile.nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(REPO / script), *args,
        ]  # fmt: skip

    @staticmethod
    def side_by_side(stages: list[Callable[[], None]], jobs: int) -> None:
        """Run independent stages, `jobs` at a time, in the list's order. Every stage runs even when
        another fails (each finished one keeps its DONE.json, so a re-run skips it); then the first
        failure is raised."""
        if jobs <= 1:
            for stage in stages:
                stage()
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = [pool.submit(stage) for stage in stages]
        errors = [error for f in futures if (error := f.exception()) is not None]
        if errors:
            raise errors[0]

    # ------------------------------------------------------------------ stages
    def data(self) -> None:
        from .data import write_clip_lmdb, write_prompt_file
        from .render import split_prompts

        def run() -> None:
            train, heldout = split_prompts()
            d = self.stage_dir("data")
            write_prompt_file(d / "train_prompts.txt", train)
            write_prompt_file(d / "heldout_prompts.txt", heldout)
            rows = write_clip_lmdb(d / "clips", train, TRAIN_FRAMES, self.profile.random_start)
            _say(f"  {len(train)} training prompts ({rows} clips), {len(heldout)} held out")

        self._run_stage("data", "render the world: prompt files and the training clips as an LMDB", run)

    def train(self, stage: str, what: str, overrides: list[str], steps: int, jobs: int = 1) -> None:
        """Train one stage through train.py and export its weights; `jobs`: stages running side by side."""

        def run() -> None:
            run_dir = self.stage_dir(stage)
            args = [
                "--config", str(CONFIGS / f"{CONFIG_OF[stage]}.yaml"), "--logdir", str(run_dir),
                f"max_steps={steps}", f"log_iters={max(1, min(250, steps))}",
                *overrides, *(RANDOM_START_OVERRIDES if self.profile.random_start else ()),
                *self.profile.overrides.get(stage, []),
            ]  # fmt: skip
            self._subprocess(stage, self._torchrun("train.py", args), total_steps=steps, jobs=jobs)
            export = [sys.executable, str(REPO / "scripts" / "export_checkpoint.py"), "--logdir", str(run_dir),
                      "--output", str(run_dir / "export")]  # fmt: skip
            self._subprocess(stage, export, jobs=jobs)

        self._run_stage(stage, what, run)

    def ode_pairs(self, stage: str = "ode_pairs", frames: int = TRAIN_FRAMES, jobs: int = 1) -> None:
        """Exact-teacher trajectories of `frames` frames (`ode_pairs_i2v`: 13, for the I2V ODE init)."""
        p = self.profile
        steps = p.ode_sampler_steps
        keep = [0, steps // 4, steps // 2, 3 * steps // 4, -1]  # t = 1000, 937.5, 833.3, 625 (shift 5), 0

        def run() -> None:
            args = [
                "--prompts", str(self.stage_dir("data") / "train_prompts.txt"), "--out", str(self.stage_dir(stage)),
                "--model", "world", "--weights", "exact-random-start" if p.random_start else "exact",
                "--text_encoder", "world", "--negative_prompt", "",
                "--guidance_scale", "1", "--shift", "5", "--num_steps", str(steps),
                "--keep_indices", *map(str, keep), "--samples_per_prompt", str(p.pairs_per_prompt),
                "--latent_frames", str(frames), "--latent_height", "4", "--latent_width", "4",
                "--batch_size", "64",
            ]  # fmt: skip
            self._subprocess(stage, self._torchrun("scripts/generate_ode_pairs.py", args), jobs=jobs)

        what = f"exact-teacher ODE trajectories of {frames} frames ({p.pairs_per_prompt} per training prompt)"
        self._run_stage(stage, what, run)

    def image_to_video(self, jobs: int = 1) -> None:
        """The I2V student's slot: 13-frame ODE pairs, the I2V ODE init (the ODE init fine-tuned on them
        with the first frame clean, as configs/ode_init_i2v.yaml does for Wan), then Self-Forcing DMD
        image-to-video from it, its critic from it too. Without the I2V ODE init, DMD alone had to learn
        frame 12 (past the 12-frame networks' positions) and reached continuation accuracy 0.38 (README)."""
        paths = self.paths()
        self.ode_pairs("ode_pairs_i2v", I2V_FRAMES, jobs)
        self.train(
            "ode_i2v", "I2V ODE init: the ODE init on 13-frame trajectories, the first frame given",
            [f"data_path={self.stage_dir('ode_pairs_i2v')}", f"generator_ckpt={paths['ode']}"],
            self.profile.i2v_ode_steps, jobs,
        )  # fmt: skip
        init = [f"generator_ckpt={paths['ode_i2v']}", f"fake_score_ckpt={paths['ode_i2v']}"]
        self.train(
            "sf_dmd_i2v", f"{LABELS['sf_dmd_i2v']} from the I2V ODE init", [paths["clips"], *init],
            self.profile.i2v_distill_steps or self.profile.distill_steps, jobs,
        )  # fmt: skip

    def paths(self) -> dict[str, str]:
        d = self.stage_dir
        return {
            "clips": f"data_path={d('data') / 'clips'}",
            "prompts": f"data_path={d('data') / 'train_prompts.txt'}",
            "base": str(d("base") / "export" / "generator"),
            "ode": str(d("ode") / "export" / "generator"),
            "ode_i2v": str(d("ode_i2v") / "export" / "generator"),
        }

    def base_schedule(self) -> list[str]:
        """The base's LR overrides: a step down to base.yaml's lr_min for its last `base_low_lr_steps`."""
        p = self.profile
        if not p.base_low_lr_steps:
            return []
        return ["lr_schedule=step", f"lr_decay_start={p.base_steps - p.base_low_lr_steps}"]

    def run(self) -> None:
        p = self.profile
        paths = self.paths()
        self.data()
        self.train(
            "base",
            "base model: bidirectional network regressing the exact teacher",
            [paths["clips"], *self.base_schedule()],
            p.base_steps,
        )
        # With stages side by side the base's evaluation (nothing reads it before the report) waits
        # for the distillation stages and fills a core one of them leaves idle.
        pool_base_eval = p.jobs > 1
        if not pool_base_eval:
            self.evaluate_base()
        self.ode_pairs()
        self.train(
            "ode", "ODE initialisation of the causal student from the base",
            [f"data_path={self.stage_dir('ode_pairs')}", f"generator_ckpt={paths['base']}"], p.ode_steps,
        )  # fmt: skip
        # Generator and critic both start from the ODE init: at 800 steps a critic started from the base
        # let Self-Forcing DMD collapse onto one shade (157/2/1), one started from the ODE init did not
        # (40/10/30; README, "Distillation knobs"). Every distillation run gets the same critic.
        from_ode = [f"generator_ckpt={paths['ode']}", f"fake_score_ckpt={paths['ode']}"]
        distill = [("sf_dmd", "Self-Forcing DMD from the ODE init", paths["prompts"])]
        data_of = {
            "dmd_teacher_forcing": "clips",
            "dmd_diffusion_forcing": "clips",
            "sf_sid": "prompts",
            "sf_gan": "clips",
        }
        distill += [(stage, f"baseline: {LABELS[stage]}", paths[data_of[stage]]) for stage in p.baselines]
        jobs = min(p.jobs, len(distill) + p.i2v + pool_base_eval)
        tasks = [
            (s, partial(self.train, s, what, [data, *from_ode], p.distill_steps, jobs))
            for s, what, data in distill
        ]
        if p.i2v:  # the same critic steps, from its own ODE init; the clips' first frames as images
            tasks.append(("sf_dmd_i2v", partial(self.image_to_video, jobs)))
        if pool_base_eval:
            tasks.append(("base_eval", self.evaluate_base))
        tasks.sort(key=lambda task: -SIDE_BY_SIDE_SECONDS[task[0]])  # longest first
        with _torch_threads(jobs):
            self.side_by_side([run for _, run in tasks], jobs)
        self._run_stage(
            "eval",
            "evaluate every student (4-step autoregressive inference, 12 and 36 frames)",
            self.evaluate,
        )
        from .report import ReportInputs, write_report

        i2v = self.i2v_students()
        t2v = ("data", "base", "base_eval", "ode_pairs", "ode", "sf_dmd")
        # the I2V student after the T2V stages it follows from: its pairs, its ODE init, itself
        stages = (*t2v, *(("ode_pairs_i2v", *i2v) if p.i2v else ()), *p.baselines, "eval")
        write_report(
            ReportInputs(
                root=self.root, profile=p.name, machine=self.machine(),
                metrics=self.stage_dir("eval") / "metrics.json", samples=self.stage_dir("eval") / "samples.pt",
                students=self.students(), heldout_prompts=self.eval_prompts()["heldout"],
                stage_times={s: self.wall_time(s) for s in stages},
                loss_logs={s: self.stage_dir(s) / "metrics.jsonl" for s in ("base", "ode", "sf_dmd", *i2v, *p.baselines)},
                labels=LABELS, continuation=self.stage_dir("eval") / "continuation.json",
                continuation_samples=self.stage_dir("eval") / "continuation_samples.pt",
                world=RANDOM_START_WORLD if p.random_start else CENTRE_START_WORLD,
            )
        )  # fmt: skip
        _say(f"[report] {self.root / 'report.md'}")

    # ------------------------------------------------------------------ evaluation
    def students(self) -> list[str]:
        return ["ode", "sf_dmd", *self.profile.baselines]

    def i2v_students(self) -> tuple[str, ...]:
        """The image-to-video runs judged from the first frame: the I2V ODE init and the I2V student."""
        return ("ode_i2v", "sf_dmd_i2v") if self.profile.i2v else ()

    def eval_prompts(self) -> dict[str, list]:
        from .render import split_prompts

        train, heldout = split_prompts()
        return {"heldout": heldout, "train": train[: self.profile.eval_train_prompts]}

    def evaluate_base(self) -> None:
        """The base model's own quality: every later stage inherits it (the ODE pairs' student starts
        from it)."""
        from .evaluate import evaluate
        from .sampling import base_ode_samples, base_x0_rmse, generate

        def run() -> None:
            p = self.profile
            prompts = self.eval_prompts()
            base = self.stage_dir("base")
            config = base / "config.yaml"  # the run's own merged config (profile overrides included)
            # The students' few-step schedule, applied to the whole clip at once.
            schedule = few_step_overrides(load_student_config("sf_dmd"))
            results: dict[str, dict] = {}
            for split in ("heldout", "train"):
                asked = [q for q in prompts[split] for _ in range(p.eval_samples)]
                for name, videos in (
                    (split, lambda a=asked: generate(base, config, a, TRAIN_FRAMES, schedule)),
                    (f"{split}_ode{BASE_ODE_STEPS}", lambda a=asked: base_ode_samples(base, config, a, TRAIN_FRAMES, BASE_ODE_STEPS)),
                ):  # fmt: skip
                    ev = evaluate(videos(), asked, random_start=p.random_start)
                    results[name] = {"summary": ev.summary(), "segments": ev.per_segment()}
            results["x0_rmse"] = {
                split: base_x0_rmse(base, config, prompts[split], TRAIN_FRAMES, X0_TIMESTEPS, p.random_start)
                for split in ("heldout", "train")
            }
            (self.stage_dir("base_eval") / "metrics.json").write_text(json.dumps(results, indent=1))
            s = results[f"heldout_ode{BASE_ODE_STEPS}"]["summary"]
            _say(
                f"  base, held-out, {BASE_ODE_STEPS}-step ODE: all attributes {s['all_attributes']:.2f}, "
                f"coherence {s['coherence']:.2f}; x0 RMSE vs the exact teacher {results['x0_rmse']['heldout']}"
            )

        self._run_stage("base_eval", "evaluate the base model (4-step and ODE samples, x0 error)", run)

    def evaluate(self) -> None:
        from .evaluate import evaluate
        from .render import Clip, render, starts
        from .sampling import generate

        p = self.profile
        prompts = self.eval_prompts()
        results: dict[str, dict] = {}
        videos_out: dict[str, torch.Tensor] = {}
        jobs = {
            "heldout": (prompts["heldout"], p.eval_samples, TRAIN_FRAMES),
            "train": (prompts["train"], p.eval_samples, TRAIN_FRAMES),
            "heldout_long": (prompts["heldout"], p.long_samples, LONG_FRAMES),
        }
        # The data itself, sampled the way a perfect student would (uniform shades and starts): the
        # reference row.
        data_rows = {}
        first = starts(p.random_start)
        for split, (plist, n, frames) in jobs.items():
            clips = torch.stack(
                [render(Clip(q, i % 3, first[(i + j) % len(first)]), frames) for j, q in enumerate(plist) for i in range(n)]
            )  # fmt: skip
            asked = [q for q in plist for _ in range(n)]
            ev = evaluate(clips, asked, random_start=p.random_start)
            data_rows[split] = {"summary": ev.summary(), "segments": ev.per_segment()}
        results["data"] = data_rows
        results["base"] = json.loads((self.stage_dir("base_eval") / "metrics.json").read_text())
        for student in self.students():
            rows = {}
            for split, (plist, n, frames) in jobs.items():
                asked = [q for q in plist for _ in range(n)]
                run = self.stage_dir(student)
                videos = generate(run, run / "config.yaml", asked, frames, self.long_window(run, frames))
                ev = evaluate(videos, asked, random_start=p.random_start)
                rows[split] = {"summary": ev.summary(), "segments": ev.per_segment()}
                if split == "heldout":
                    videos_out[student] = videos[::n][:4]  # first sample of the first 4 prompts
            results[student] = rows
            _say(
                f"  {LABELS[student]}: held-out all attributes {rows['heldout']['summary']['all_attributes']:.2f}"
            )
        out = self.stage_dir("eval")
        (out / "metrics.json").write_text(json.dumps(results, indent=1))
        torch.save(videos_out, out / "samples.pt")
        self.evaluate_continuation()

    def evaluate_continuation(self) -> None:
        """Every student continues real held-out clips from their first block (12 and 36 generated
        frames); Self-Forcing DMD and the I2V student from their first frame (image-to-video)."""
        from .continuation_eval import run_continuation_eval

        p = self.profile
        runs = {s: self.stage_dir(s) for s in (*self.students(), *self.i2v_students())}
        settings = {s: ["first_block", "first_block_long"] for s in self.students()}
        settings["sf_dmd"].append("first_frame")
        for s in self.i2v_students():  # blocks of [1, 3, 3, ...]: they take one given frame, the image
            settings[s] = ["first_frame"]
        run_continuation_eval(runs, settings, self.eval_prompts()["heldout"], p.eval_samples, p.long_samples,
                              self.window(), self.stage_dir("eval"), say=_say, random_start=p.random_start)  # fmt: skip

    def window(self) -> tuple[str, ...]:
        """The rolling window of rollouts past the training length (no sink with random starts)."""
        return RANDOM_START_LONG_WINDOW if self.profile.random_start else LONG_WINDOW

    def long_window(self, run: Path, frames: int) -> tuple[str, ...]:
        """Overrides for a rollout of `frames`: the window past the training length (see window_overrides)."""
        from .continuation_eval import window_overrides

        return window_overrides(run / "config.yaml", frames, self.window())

    def machine(self) -> str:
        return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, {self.profile.nproc} process(es)"
