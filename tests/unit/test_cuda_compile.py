"""CI compile check of the CUDA kernels (nvcc, sm_80 and sm_90) — no GPU needed.

An actual compile to object files with the extension's own flags (model.build.nvcc_command);
the C++ source is compiled alongside by the host compiler. Skipped when nvcc is absent.
"""

import shutil
import subprocess
import time

import pytest

from model import build


@pytest.mark.skipif(build.cuda_home() is None, reason="nvcc not found")
def test_cuda_sources_compile_for_sm80_and_sm90(tmp_path):
    cu_obj, cpp_obj = tmp_path / "roi_align_kernel.o", tmp_path / "roi_align.o"
    start = time.monotonic()
    jobs = [
        subprocess.Popen(
            build.nvcc_command(build.SOURCE_DIR / "roi_align_kernel.cu", cu_obj, ["8.0", "9.0"]),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ),
        subprocess.Popen(
            build.host_command(build.SOURCE_DIR / "roi_align.cpp", cpp_obj),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ),
    ]
    outputs = [job.communicate(timeout=600)[0] for job in jobs]
    for job, out in zip(jobs, outputs):
        assert job.returncode == 0, f"{' '.join(job.args[:3])} failed:\n{out[-4000:]}"
    assert cu_obj.stat().st_size > 0 and cpp_obj.stat().st_size > 0
    # the object holds device code for both architectures
    cuobjdump = shutil.which("cuobjdump", path=f"{build.cuda_home()}/bin")
    if cuobjdump:
        listing = subprocess.run([cuobjdump, "--list-elf", str(cu_obj)], capture_output=True, text=True).stdout
        assert "sm_80" in listing and "sm_90" in listing, listing
    print(f"compiled in {time.monotonic() - start:.0f} s")
