"""`keep_freed_host_memory`: after it, re-allocating a freed tensor costs no page faults (the kernel's
own minor-fault counter is the reference)."""

from __future__ import annotations

import resource

import pytest
import torch

from utils.host_memory import keep_freed_host_memory


def _faults_while(fn, times: int) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(times):
        fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_a_freed_16_mib_tensor_is_reused_without_page_faults():
    if not keep_freed_host_memory():
        pytest.skip("not glibc on Linux: nothing to tune")

    def step() -> None:  # like an activation: allocated, written, freed every step
        torch.empty(4 << 20).fill_(1.0)

    _faults_while(step, 2)  # the first allocation faults its 4096 pages in once
    assert _faults_while(step, 10) < 200  # page-faulted anew each time it would be >= 40960
