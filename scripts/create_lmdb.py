"""Convert per-prompt ``.pt`` dumps into an LMDB dataset (spec §7.3).

Each ``.pt`` file holds ``{prompt: tensor[1, *row_shape]}`` (e.g. ``[1, K+1, F, C, H, W]`` ODE
trajectories from ``generate_ode_pairs``, or ``[1, F, C, H, W]`` clean latents). Files are read in sorted
order, a prompt already stored (in this run or, with ``--append``, before) is skipped, and each file's
rows are committed atomically in float16.

    python -m scripts.create_lmdb --data_path ode_pairs/ --lmdb_path data/ode_lmdb [--append]
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from utils.lmdb import DEFAULT_MAP_SIZE, LMDBFormatError, LMDBWriter

logger = logging.getLogger(__name__)


def _load_rows(path: Path) -> tuple[list[str], list[torch.Tensor]]:
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise LMDBFormatError(f"{path}: cannot load as a torch file ({err})") from err
    if not isinstance(content, dict):
        raise LMDBFormatError(f"{path}: expected a dict {{prompt: tensor}}, got {type(content).__name__}")
    prompts, rows = [], []
    for prompt, tensor in content.items():
        if not isinstance(prompt, str) or not isinstance(tensor, torch.Tensor):
            raise LMDBFormatError(
                f"{path}: expected {{str: tensor}} entries, got {type(prompt).__name__}: {type(tensor).__name__}"
            )
        # Upstream concatenates the values along axis 0, so each must carry exactly one row.
        if tensor.dim() < 2 or tensor.shape[0] != 1:
            raise LMDBFormatError(
                f"{path}: tensor for prompt {prompt[:60]!r} has shape {tuple(tensor.shape)}; "
                "expected [1, *row_shape]"
            )
        prompts.append(prompt)
        rows.append(tensor[0])
    return prompts, rows


def convert_pt_dir(
    src: str | os.PathLike, dst: str | os.PathLike, append: bool = False, map_size: int = DEFAULT_MAP_SIZE
) -> int:
    """Write the rows of every ``src/*.pt`` (sorted by name) into the LMDB at ``dst``, skipping prompts
    already present; returns the number of rows written by this call."""
    files = sorted(Path(src).glob("*.pt"))
    if not files:
        raise FileNotFoundError(f"{src}: no .pt files")
    written = duplicates = 0
    start = time.perf_counter()
    with LMDBWriter(dst, append=append, map_size=map_size) as writer:
        for path in tqdm(files, desc="create_lmdb", unit="file"):
            prompts, rows = _load_rows(path)
            new_prompts, new_rows = [], []
            for prompt, row in zip(prompts, rows):
                # dict keys are unique within a file, so only earlier files can repeat a prompt
                if writer.contains(prompt):
                    duplicates += 1
                    continue
                new_prompts.append(prompt)
                new_rows.append(row)
            try:
                writer.write_many(new_prompts, new_rows)
            except LMDBFormatError as err:
                raise LMDBFormatError(f"{path}: {err}") from err
            written += len(new_prompts)
        total = len(writer)
    elapsed = time.perf_counter() - start
    logger.info(
        "%s: wrote %d rows (%d duplicate prompts skipped, %d rows in total) in %.1f s, %.2f rows/s",
        dst,
        written,
        duplicates,
        total,
        elapsed,
        written / max(elapsed, 1e-9),
    )
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data_path", required=True, help="directory of {prompt: tensor[1, ...]} .pt files")
    parser.add_argument("--lmdb_path", required=True, help="output LMDB environment directory")
    parser.add_argument(
        "--append", action="store_true", help="add to an existing LMDB with the same row shape"
    )
    parser.add_argument(
        "--map_size", type=int, default=DEFAULT_MAP_SIZE, help="initial LMDB map size in bytes (grows itself)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    convert_pt_dir(args.data_path, args.lmdb_path, append=args.append, map_size=args.map_size)


if __name__ == "__main__":
    main()
