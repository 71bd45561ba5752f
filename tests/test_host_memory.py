"""`keep_freed_host_memory`: a freed tensor's memory stays in the process instead of going back to the
kernel. glibc's own counters (`mallinfo2`) are the reference, read in fresh processes, one with the call
and one without (the control), so the heap's history in the test process cannot decide the outcome."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from utils.host_memory import keep_freed_host_memory

ROOT = Path(__file__).resolve().parents[1]

# A 24 MiB tensor: above glibc's initial mmap threshold (128 KiB, raised only by freeing mmapped
# blocks), below the one `keep_freed_host_memory` sets (32 MiB).
_PROBE = """
import ctypes, json, sys
import torch
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "keep":
    from utils.host_memory import keep_freed_host_memory
    assert keep_freed_host_memory()
before = libc.mallinfo2()
x = torch.empty(6 << 20).fill_(1.0)
during = libc.mallinfo2()
del x
after = libc.mallinfo2()
print(json.dumps({"mmapped": during.hblkhd - before.hblkhd, "kept_free": after.fordblks - before.fordblks}))
"""


def _probe(mode: str) -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], cwd=ROOT, capture_output=True, text=True, check=True,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_freed_24_mib_tensor_stays_in_the_process():
    if not keep_freed_host_memory():
        pytest.skip("not glibc on Linux: nothing to tune")
    mib = 1 << 20
    control, kept = _probe("default"), _probe("keep")
    # glibc as shipped: the tensor gets its own mapping, and freeing it unmaps it (nothing kept)
    assert control["mmapped"] >= 24 * mib and control["kept_free"] < 12 * mib, control
    # after the call: the tensor lives in the heap, and its memory stays there, free, once it is freed
    # (a few KiB of it may go to the heap's own bookkeeping)
    assert kept["mmapped"] < 12 * mib and kept["kept_free"] >= 20 * mib, kept
