"""Build (ahead of time) and load the RoIAlign extension in ``model/cuda``.

``python -m model.build [--cuda | --no-cuda] [--arch 8.0 9.0] [--verbose]`` compiles the op
with ``torch.utils.cpp_extension.load`` (ninja) into a cache folder keyed by the torch
version and a hash of the sources and flags:

    $MASKRAY_OPS_DIR (default ~/.cache/maskray/ops) / <torch version>-<hash>-<variant> / maskray_ops.so

where <variant> is ``cpu`` or e.g. ``cuda-sm80-sm90``. A process without a GPU can load any
variant (CUDA builds hold the CPU kernels too), so one image-built CUDA library serves all.

``model.ops`` calls :func:`load`, which loads that library, building it first (JIT, with a
log line) when it is missing. CUDA sources are compiled only when a GPU is visible and
nvcc / CUDA_HOME are found; otherwise the CPU-only library (one translation unit) is built.
A failed build raises :class:`~model.errors.MaskrayError` with the compiler's last lines;
there is never a fallback to torchvision's kernels.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
from pathlib import Path

from model.errors import MaskrayError

log = logging.getLogger(__name__)

NAME = "maskray_ops"
SOURCE_DIR = Path(__file__).resolve().parent / "cuda"
CPP_SOURCES = ["roi_align.cpp"]
CUDA_SOURCES = ["roi_align_kernel.cu"]
HEADERS = ["roi_align_common.h", "roi_align_checks.h"]
CFLAGS = ["-O3", "-fopenmp"]
LDFLAGS = ["-fopenmp"]
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
# MASKRAY_OPS_SANITIZE=1 (``make sanitize``): the CPU kernels built with AddressSanitizer and
# UndefinedBehaviorSanitizer, any UB report fatal. The flags enter the cache key, so this build
# never replaces the normal one. Loading it needs libasan preloaded (LD_PRELOAD, see Makefile).
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"]
if os.environ.get("MASKRAY_OPS_SANITIZE") == "1":
    CFLAGS = CFLAGS + SANITIZE_FLAGS
    LDFLAGS = LDFLAGS + SANITIZE_FLAGS


def cuda_home() -> str | None:
    """The CUDA toolkit folder holding bin/nvcc, or None.

    $CUDA_HOME / $CUDA_PATH first, then /usr/local/cuda, then torch's guess (which, with an
    nvcc wrapper script on PATH, can be a folder without the CUDA headers and libraries).
    """
    from torch.utils import cpp_extension

    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
                      cpp_extension.CUDA_HOME):
        if candidate and (Path(candidate) / "bin" / "nvcc").exists():
            return candidate
    return None


def extra_cuda_includes() -> list[str]:
    """Header folders of the pip-installed CUDA libraries (cusparse.h etc. live in nvidia/cu13/include)."""
    import torch

    site = Path(torch.__file__).resolve().parent.parent
    return [str(p) for p in sorted((site / "nvidia").glob("cu*/include")) if p.is_dir()]


def cuda_wanted() -> bool:
    """Build the CUDA kernels: only when a GPU is visible and nvcc is there."""
    import torch

    return bool(torch.version.cuda) and torch.cuda.is_available() and cuda_home() is not None


def default_arch_list() -> list[str]:
    """Compute capabilities of the visible GPUs, e.g. ['9.0']."""
    import torch

    caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    return [f"{major}.{minor}" for major, minor in sorted(caps)]


def cache_root() -> Path:
    return Path(os.environ.get("MASKRAY_OPS_DIR") or Path.home() / ".cache" / "maskray" / "ops")


def torch_version_tag() -> str:
    import torch

    return torch.__version__


def _variant(with_cuda: bool, arch: list[str] | None) -> str:
    """'cpu', or 'cuda-sm80-sm90' for the compute capabilities compiled in."""
    if not with_cuda:
        return "cpu"
    return "cuda-" + "-".join("sm" + a.replace(".", "") for a in sorted(arch or []))


def _digest() -> str:
    """Hash of all sources, flags, CUDA and Python versions (not of the variant)."""
    import torch

    h = hashlib.sha256()
    for name in CPP_SOURCES + HEADERS + CUDA_SOURCES:
        h.update(name.encode())
        h.update((SOURCE_DIR / name).read_bytes())
    h.update(repr((CFLAGS, LDFLAGS, NVCC_FLAGS, torch.version.cuda, sys.version_info[:2])).encode())
    return h.hexdigest()[:16]


def build_dir(with_cuda: bool, arch: list[str] | None) -> Path:
    """The cache folder for this torch version, these sources and flags, and this variant:
    ``<cache root>/<torch version>-<hash>-<cpu | cuda-sm80-sm90>``."""
    return cache_root() / f"{torch_version_tag()}-{_digest()}-{_variant(with_cuda, arch)}"


def library_path(with_cuda: bool | None = None, arch: list[str] | None = None) -> Path:
    if with_cuda is None:
        with_cuda = cuda_wanted()
    if with_cuda and arch is None:
        arch = default_arch_list()
    return build_dir(with_cuda, arch) / f"{NAME}.so"


def _compatible_library(with_cuda: bool, arch: list[str] | None) -> Path | None:
    """An already-built variant that serves this process: any variant when only the CPU
    kernels are needed (a CUDA build holds them too, e.g. a CPU-only worker on a GPU node),
    else a CUDA build covering every wanted compute capability."""
    want = {"sm" + a.replace(".", "") for a in (arch or [])}
    digest = _digest()  # hashes every source file: once, not per candidate
    for path in sorted(cache_root().glob(f"{torch_version_tag()}-{digest}-*/{NAME}.so")):
        variant = path.parent.name.rsplit("-" + digest + "-", 1)[-1]
        if not with_cuda:
            return path
        if variant.startswith("cuda-") and want <= set(variant.split("-")[1:]):
            return path
    return None


def build(with_cuda: bool | None = None, arch: list[str] | None = None, verbose: bool = False) -> Path:
    """Compile the extension (a no-op when the cache is up to date) and return the library path.

    The library is also loaded into this process (``torch.ops.maskray`` becomes available).
    """
    from torch.utils import cpp_extension

    if with_cuda is None:
        with_cuda = cuda_wanted()
    if with_cuda and cuda_home() is None:
        raise MaskrayError(
            "cannot build the CUDA RoIAlign kernels: nvcc not found (set CUDA_HOME to the CUDA toolkit, "
            "or build with --no-cuda)"
        )
    if with_cuda and arch is None:
        arch = default_arch_list()
    if with_cuda:
        home = cuda_home()
        cpp_extension.CUDA_HOME = home  # torch's own guess may be a folder without headers
        os.environ.setdefault("CUDA_HOME", home)
    directory = build_dir(with_cuda, arch)
    directory.mkdir(parents=True, exist_ok=True)
    sources = [str(SOURCE_DIR / s) for s in CPP_SOURCES + (CUDA_SOURCES if with_cuda else [])]
    log.info(
        "building the RoIAlign op (%s) in %s", f"CPU+CUDA, arch {' '.join(arch or [])}" if with_cuda else "CPU only",
        directory,
    )
    saved_arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if with_cuda and arch:
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(arch)
    try:
        if ninja_available():
            cpp_extension.load(
                name=NAME,
                sources=sources,
                extra_cflags=CFLAGS,
                extra_ldflags=LDFLAGS,
                extra_cuda_cflags=NVCC_FLAGS,
                extra_include_paths=[str(SOURCE_DIR)] + (extra_cuda_includes() if with_cuda else []),
                build_directory=str(directory),
                with_cuda=with_cuda,
                is_python_module=False,
                verbose=verbose,
            )
        else:
            log.warning("ninja not found: building with plain compiler calls (no incremental rebuilds)")
            library = build_without_ninja(directory, with_cuda, arch or [], verbose)
            import torch

            torch.ops.load_library(str(library))
    except (RuntimeError, OSError, ImportError) as exc:
        raise _build_error(exc, directory) from exc
    finally:
        if with_cuda and arch:
            if saved_arch is None:
                os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = saved_arch
    return directory / f"{NAME}.so"


def _build_error(exc: BaseException, directory: Path) -> MaskrayError:
    text = str(exc)
    log_file = directory / "build.log"
    try:
        log_file.write_text(text)
    except OSError:
        log_file = None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    tail = " | ".join((errors or lines)[-6:])[-1500:]
    where = f"; full log in {log_file}" if log_file else ""
    return MaskrayError(
        f"building the RoIAlign op from {SOURCE_DIR} failed: {tail}{where}. Hint: a C++17 compiler (g++) and "
        "ninja are needed (and nvcc with CUDA_HOME for GPUs); retry with `python -m model.build --verbose`"
    )


def ninja_available() -> bool:
    """torch's JIT builder needs ninja; some GPU images lack it (then :func:`build_without_ninja`)."""
    from torch.utils import cpp_extension

    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError:
        return False
    return True


def host_command(source: Path, output: Path) -> list[str]:
    """A host-compiler command compiling one C++ source of the op to an object file."""
    import shutil
    import sysconfig

    from torch.utils import cpp_extension

    includes = cpp_extension.include_paths("cpu") + [sysconfig.get_paths()["include"]]
    compiler = os.environ.get("CXX") or shutil.which("c++") or "c++"
    return (
        [compiler, "-c", str(source), "-o", str(output), f"-I{SOURCE_DIR}"]
        + [arg for p in includes for arg in ("-isystem", p)]
        + [f"-DTORCH_EXTENSION_NAME={NAME}", "-DTORCH_API_INCLUDE_EXTENSION_H", "-fPIC", "-std=c++20"]
        + CFLAGS
    )


def link_command(objects: list[Path], output: Path, with_cuda: bool) -> list[str]:
    """Link the op's objects into the shared library, against torch's libraries (as torch's builder does)."""
    import shutil

    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX") or shutil.which("c++") or "c++"
    libs = ["-lc10"] + (["-lc10_cuda"] if with_cuda else []) + ["-ltorch_cpu"]
    libs += (["-ltorch_cuda"] if with_cuda else []) + ["-ltorch", "-ltorch_python"]
    if with_cuda:
        home = Path(cuda_home() or "/usr/local/cuda")
        libs += [f"-L{home / ('lib64' if (home / 'lib64').exists() else 'lib')}", "-lcudart"]
    return [compiler, "-shared", *map(str, objects), "-o", str(output), f"-L{cpp_extension.TORCH_LIB_PATH}", *libs,
            *LDFLAGS]


def build_without_ninja(directory: Path, with_cuda: bool, arch: list[str], verbose: bool = False) -> Path:
    """Compile each source (c++, and nvcc for CUDA) and link, with plain subprocess calls; the
    library lands where :func:`build` puts it. Raises RuntimeError with the compiler output."""
    import subprocess

    commands, objects = [], []
    for name in CPP_SOURCES + (CUDA_SOURCES if with_cuda else []):
        obj = directory / (name + ".o")
        source = SOURCE_DIR / name
        commands.append(nvcc_command(source, obj, arch) if name.endswith(".cu") else host_command(source, obj))
        objects.append(obj)
    library = directory / f"{NAME}.so"
    partial = directory / f"{NAME}.so.partial"  # renamed when complete: a reader never sees half a library
    commands.append(link_command(objects, partial, with_cuda))
    for command in commands:
        if verbose:
            log.info("%s", " ".join(command))
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(command[:4])} ... failed:\n{proc.stdout}\n{proc.stderr}")
    partial.replace(library)
    return library


def nvcc_command(source: Path, output: Path, arch: list[str]) -> list[str]:
    """An nvcc command compiling one CUDA source of the op to an object file (CI compile check).

    Same defines, include folders and flags as the extension build, for the given compute
    capabilities (e.g. ["8.0", "9.0"]); needs no GPU.
    """
    import sysconfig

    from torch.utils import cpp_extension

    home = cuda_home()
    if home is None:
        raise MaskrayError("nvcc not found (set CUDA_HOME to the CUDA toolkit)")
    includes = [str(SOURCE_DIR)]
    system = cpp_extension.include_paths("cpu") + [str(Path(home) / "include")] + extra_cuda_includes()
    system.append(sysconfig.get_paths()["include"])
    gencode = []
    for a in arch:
        num = a.replace(".", "")
        gencode += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
    return (
        [str(Path(home) / "bin" / "nvcc"), "-c", str(source), "-o", str(output)]
        + [f"-I{p}" for p in includes]
        + [arg for p in system for arg in ("-isystem", p)]
        + [f"-DTORCH_EXTENSION_NAME={NAME}", "-DTORCH_API_INCLUDE_EXTENSION_H"]
        + cpp_extension.COMMON_NVCC_FLAGS
        + gencode
        + ["--compiler-options", "-fPIC", "-std=c++20"]
        + NVCC_FLAGS
    )


_loaded: Path | None = None


def load() -> Path:
    """Load the op into this process (building it first when the cache lacks it)."""
    global _loaded
    if _loaded is not None:
        return _loaded
    import torch

    with_cuda = cuda_wanted()
    arch = default_arch_list() if with_cuda else None
    path = library_path(with_cuda, arch)
    if not path.exists():
        path = _compatible_library(with_cuda, arch) or path
    if not path.exists():
        log.warning("RoIAlign op not built yet for this environment: compiling it now (once; cached in %s)", path.parent)
        path = build(with_cuda, arch)
    else:
        try:
            torch.ops.load_library(str(path))
        except OSError:
            # Another process may be writing it right now (first use by parallel workers):
            # build() waits on cpp_extension's lock in the folder, is a no-op when up to date,
            # and loads the result.
            try:
                path = build(with_cuda, arch)
            except MaskrayError as exc:
                raise MaskrayError(
                    f"cannot load the RoIAlign op {path} ({exc}). Hint: delete {path.parent} and run "
                    "`python -m model.build`"
                ) from exc
    _loaded = path
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.build", description=__doc__.splitlines()[0])
    cuda = parser.add_mutually_exclusive_group()
    cuda.add_argument("--cuda", dest="cuda", action="store_true", default=None, help="also build the CUDA kernels")
    cuda.add_argument("--no-cuda", dest="cuda", action="store_false", help="build the CPU kernels only")
    parser.add_argument("--arch", nargs="+", metavar="X.Y", help="CUDA compute capabilities (default: visible GPUs)")
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.arch and args.cuda is None:
        args.cuda = True
    if args.cuda and not args.arch and not cuda_wanted():
        parser.error("--cuda needs --arch when no GPU is visible")
    try:
        path = build(with_cuda=args.cuda, arch=args.arch, verbose=args.verbose)
    except MaskrayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
