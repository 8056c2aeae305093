"""Builds the one extension moe_route._C (CPU always, CUDA when torch and a toolkit allow).

Environment:
  MOE_ROUTE_SKIP_CUDA=1   build the CPU extension only, even with CUDA torch and a toolkit
  MOE_ROUTE_FORCE_CUDA=1  fail instead of silently skipping CUDA when it cannot be built
  TORCH_CUDA_ARCH_LIST    CUDA archs (default: the visible GPUs, else DEFAULT_CUDA_ARCHS)
  MOE_ROUTE_DEBUG=1       -O0 -g
  MAX_JOBS                parallel compile jobs (torch's BuildExtension)
  MOE_ROUTE_LINK_OBJECTS=DIR
                          link the objects DIR holds, laid out as a build's temp folder lays them
                          out (DIR/csrc/cpu/gate.o), instead of compiling their sources; compile
                          the rest (bench/gpu_tune.py's variant builds reuse the base's objects)
torch is not a build requirement: install it first, then `pip install --no-build-isolation -e .`.
"""
import json
import os
import shlex
import subprocess
import sys
import tempfile

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    sys.exit("moe_route: install torch first (e.g. `pip install torch==2.13.0`), then build with "
             "`pip install --no-build-isolation -e .`")

ROOT = os.path.dirname(os.path.abspath(__file__))
CPU_SOURCES = ["csrc/registration.cpp", "csrc/python.cpp", "csrc/gate_op.cpp", "csrc/cpu/gate.cpp",
               "csrc/cpu/gate_base.cpp", "csrc/dispatch_op.cpp", "csrc/cpu/dispatch.cpp",
               "csrc/cpu/isa.cpp"]
# The topk_gate kernel's builds are spread over several units (gate.cu has the launcher) so that
# they compile in parallel; CMakeLists.txt's gate_build_units lists the same.
GATE_UNITS = ["gate", "gate_full", "gate_full32", "gate_replay", "gate_replay32", "gate_wide",
              "gate_wide32"]
CUDA_SOURCES = [f"csrc/cuda/{unit}.cu" for unit in GATE_UNITS] + [
    "csrc/cuda/gate_glue.cpp", "csrc/cuda/dispatch.cu", "csrc/cuda/dispatch_glue.cpp"]


def flag(name):
    return os.environ.get(name, "").lower() not in ("", "0", "false", "no")


def cuda_decision():
    """(build_cuda, reason)."""
    if flag("MOE_ROUTE_SKIP_CUDA"):
        return False, "MOE_ROUTE_SKIP_CUDA is set"
    if torch.version.cuda is None:
        why = f"torch {torch.__version__} is not a CUDA build"
    elif CUDA_HOME is None:
        why = "no CUDA toolkit found (set CUDA_HOME)"
    else:
        return True, f"torch CUDA {torch.version.cuda}, toolkit at {CUDA_HOME}"
    if flag("MOE_ROUTE_FORCE_CUDA"):
        sys.exit(f"moe_route: MOE_ROUTE_FORCE_CUDA is set but CUDA cannot be built: {why}")
    return False, why


def git_sha():
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                       stderr=subprocess.DEVNULL, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# With no GPU to ask: machine code for Ampere (run by Ada too) and for Hopper, and compute_80 PTX,
# which the driver compiles at first use on any later GPU (Blackwell) instead of failing there with
# "no kernel image". With GPUs visible, torch picks their archs and adds PTX for the newest.
DEFAULT_CUDA_ARCHS = "8.0+PTX;9.0a"

BUILD_CUDA, CUDA_REASON = cuda_decision()
if BUILD_CUDA and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
    os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS

debug = flag("MOE_ROUTE_DEBUG")
opt = ["-O0", "-g"] if debug else ["-O3", "-g"]
# No FMA contraction: results are then identical whichever ISA variant the CPU kernels run.
# -fno-trapping-math lets GCC if-convert float compares (vectorising them) and -fno-math-errno
# vectorise sqrt (the exact IEEE instruction either way: nothing reads errno); IEEE results, NaN
# and inf semantics are unchanged, unlike -ffast-math.
cxx_flags = opt + ["-ffp-contract=off", "-fno-trapping-math", "-fno-math-errno", "-Wall",
                   "-Wno-unused-function", "-Wno-psabi"]
link_flags = []


def openmp_reason():
    """Why the CPU kernels are built without OpenMP ("" when they are built with it).

    at::parallel_for expands OpenMP pragmas inside our translation units: without -fopenmp they run
    on one thread. Apple's clang rejects -fopenmp, so the flag is tried on a small program first;
    a compiler without it still builds the extension, serial."""
    if not torch.backends.openmp.is_available():
        return f"torch {torch.__version__} is built without OpenMP"
    cxx = shlex.split(os.environ.get("CXX", "c++"))
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        try:
            subprocess.run(cxx + ["-fopenmp", src, "-o", os.path.join(tmp, "probe")], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except (OSError, subprocess.CalledProcessError):
            return f"{cxx[0]} does not build an OpenMP program with -fopenmp"
    return ""


OPENMP_REASON = openmp_reason()
if OPENMP_REASON:
    print(f"moe_route: the CPU kernels will run on one thread: {OPENMP_REASON}", file=sys.stderr)
else:
    cxx_flags.append("-fopenmp")
    link_flags.append("-fopenmp")
nvcc_flags = opt + ["-lineinfo", "--expt-relaxed-constexpr"]


def shared_libstdcxx() -> list:
    """The C++ runtime torch runs on, to link by its path where the compiler has only a static
    libstdc++ (`-print-file-name` finds no libstdc++.so), else nothing.

    A static copy inside the extension is a second runtime beside torch's. Built so by the H200
    image's /opt/gcc g++ 13.3, every error message the extension wrote with an ostringstream
    (shape_str) crashed the process inside that copy's ostream instead of raising; with g++ 12
    and -static-libstdc++ on a CPU machine the same messages lost their numbers ("got shape (").
    bench/RESULTS.md, 2026-11-29."""
    if not sys.platform.startswith("linux"):
        return []
    cxx = shlex.split(os.environ.get("CXX", "c++"))
    try:
        found = subprocess.check_output(cxx + ["-print-file-name=libstdc++.so"], text=True,
                                        stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return []
    if os.path.isabs(found):
        return []
    with open("/proc/self/maps") as maps:  # torch is imported: its libstdc++ is mapped
        loaded = sorted({line.split()[-1] for line in maps if "/libstdc++.so" in line})
    if len(loaded) != 1:
        sys.exit(f"moe_route: {cxx[0]} links libstdc++ statically, and the one torch loaded "
                 f"could not be told ({loaded or 'none'}): set CXX to a compiler with a shared "
                 "libstdc++")
    return loaded


link_flags += shared_libstdcxx()


def split_prebuilt(sources):
    """(sources to compile, objects to link as they are) under MOE_ROUTE_LINK_OBJECTS."""
    prebuilt = os.environ.get("MOE_ROUTE_LINK_OBJECTS")
    if not prebuilt:
        return sources, []
    objects = {src: os.path.join(prebuilt, os.path.splitext(src)[0] + ".o") for src in sources}
    compiled = [src for src in sources if not os.path.isfile(objects[src])]
    if not compiled:  # torch's ninja build takes one source at least
        compiled = sources[-1:]
    return compiled, [objects[src] for src in sources if src not in compiled]


if BUILD_CUDA:
    sources, objects = split_prebuilt(CPU_SOURCES + CUDA_SOURCES)
    ext = CUDAExtension(
        "moe_route._C", sources, extra_objects=objects,
        define_macros=[("MOE_ROUTE_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, extra_link_args=link_flags)
else:
    sources, objects = split_prebuilt(CPU_SOURCES)
    ext = CppExtension("moe_route._C", sources, extra_objects=objects,
                       extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)


class Build(BuildExtension):
    def run(self):
        super().run()
        info = {
            "version": "0.1.0", "git": git_sha(), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "cuda_built": BUILD_CUDA, "cuda_reason": CUDA_REASON,
            "cuda_archs": os.environ.get("TORCH_CUDA_ARCH_LIST") if BUILD_CUDA else None,
            "openmp": not OPENMP_REASON, "openmp_reason": OPENMP_REASON or None,
            "debug": debug, "python": sys.version.split()[0],
        }
        for out in {os.path.join(ROOT, "moe_route"),
                    os.path.join(self.build_lib, "moe_route")}:
            if os.path.isdir(out):
                with open(os.path.join(out, "_build_info.json"), "w") as f:
                    json.dump(info, f, indent=2)


setup(ext_modules=[ext], cmdclass={"build_ext": Build})
