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
    print(sum(faults[8:]))
""")


def late_step_faults(mode: str) -> int:
    """Minor page faults of steps 9-24 of a 24-step loop, in a fresh process."""
    result = subprocess.run([sys.executable, "-c", STEP_FAULTS, mode], capture_output=True, text=True, check=True)
    return int(result.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc and minor-fault counts")
def test_repeated_step_stops_page_faulting():
    pages = 16 * (16 << 20) * 4 // 4096  # the 64 MB tensor alone, in 16 steps
    default = late_step_faults("default")
    assert default >= pages  # glibc hands its blocks back to the kernel every step
    # Kept, the freed blocks are reused. Not always all of them: the heap's layout varies from run
    # to run, and in some runs a step still cuts a 32 or 64 MB block from fresh heap (seen as late
    # as step 21 on CI's VM), so the test asks for a tenfold drop, not for zero.
    assert late_step_faults("keep") < default // 10
