"""jmp_ext.cpu.keep_freed_memory: a repeated step stops page-faulting its memory in again."""

import subprocess
import sys
import textwrap

import pytest

STEP_FAULTS = textwrap.dedent("""
    import resource, sys, torch
    from jmp_ext.cpu import keep_freed_memory
    if sys.argv[1] == "keep":
        assert keep_freed_memory()

    def step():  # large temporaries freed out of order, as in a training step
        a = torch.ones(16 << 20); b = torch.ones(8 << 20); c = a + 1; d = b * 2
        del a
        e = c + 1
        del b, c
        return e + d.sum()

    faults = []
    for _ in range(24):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(sum(faults[-4:]))
""")


def late_step_faults(mode: str) -> int:
    """Minor page faults of steps 21-24 of a 24-step loop, in a fresh process (the heap settles
    over a varying number of early steps: up to 6 on the 2026-12-02 VM)."""
    result = subprocess.run([sys.executable, "-c", STEP_FAULTS, mode], capture_output=True, text=True, check=True)
    return int(result.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc and minor-fault counts")
def test_repeated_step_stops_page_faulting():
    pages = 4 * (16 << 20) * 4 // 4096  # the 64 MB tensor alone, in 4 steps
    assert late_step_faults("default") >= pages  # glibc hands it back to the kernel every step
    # Warmed up, the freed blocks are reused (a few may still be cut from fresh heap).
    assert late_step_faults("keep") < pages // 4
