"""Packaging and loading: import, info(), public names, the reference fallback and strict mode."""
from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import moe_route
from conftest import HAS_CPU_KERNEL

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("MOE_ROUTE_NO_EXT", "MOE_ROUTE_STRICT")}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=120)


def test_public_names():
    assert moe_route.__version__ == "0.1.0"
    for name in moe_route.__all__:
        assert hasattr(moe_route, name), name
    assert {"topk_gate", "RouterSpec", "SteerSpec", "GateStats", "info"} <= set(moe_route.__all__)
    assert moe_route.topk_gate is moe_route.ops.topk_gate
    assert set(moe_route.ops.__all__) <= set(dir(moe_route))


def test_cli_help_lists_one_command_per_line(capsys):
    """The top-level help keeps the module docstring's layout: a usage line per subcommand,
    each of which the parser knows."""
    from moe_route.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    lines = [line.split()[1] for line in capsys.readouterr().out.splitlines()
             if line.startswith("    moe-route ")]
    assert lines == ["demo", "analyze", "experts", "evaluate", "compare", "supported", "info"]


def test_default_cuda_archs_run_on_newer_gpus(monkeypatch):
    """A CUDA build on a machine with no GPU uses setup.py's default arch list. It must hold
    machine code for Ampere and Hopper and PTX, which the driver compiles at first use on a later
    GPU (without it, a Blackwell GPU fails every launch with "no kernel image")."""
    from torch.utils import cpp_extension

    arch_flags = getattr(cpp_extension, "_get_cuda_arch_flags", None)
    if arch_flags is None:
        pytest.skip("this torch has no cpp_extension._get_cuda_arch_flags")
    archs = re.search(r'^DEFAULT_CUDA_ARCHS = "([^"]+)"$', (ROOT / "setup.py").read_text(), re.M)
    assert archs, "setup.py no longer defines DEFAULT_CUDA_ARCHS"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", archs.group(1))
    flags = arch_flags()
    want = {"-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a"}
    assert want <= set(flags)
    ptx = r"-gencode=arch=compute_(\d+),code=compute_\1"
    assert any(re.fullmatch(ptx, f) for f in flags), flags


def test_every_kernel_unit_is_built():
    """The gate's kernel builds are spread over several .cu units. setup.py's build and CMake's
    (CI's compile check, the self-tests, the host emulator) must both list every unit: a unit
    missing from one of them fails only at link or load time, and only where nvcc runs."""
    units = {p.stem for p in (ROOT / "csrc" / "cuda").glob("gate*.cu")
             if not p.stem.endswith("_selftest")}
    setup_units = re.search(r"^GATE_UNITS = (\[[^\]]*\])", (ROOT / "setup.py").read_text(), re.M)
    assert setup_units, "setup.py no longer defines GATE_UNITS"
    assert set(ast.literal_eval(setup_units.group(1))) == units
    cmake = re.search(r"^set\(gate_build_units ([^)]*)\)", (ROOT / "CMakeLists.txt").read_text(),
                      re.M)
    assert cmake, "CMakeLists.txt no longer sets gate_build_units"
    assert set(cmake.group(1).split()) | {"gate"} == units


def _kernel_sources() -> str:
    """The CUDA kernels' sources (not the self-tests), comments removed."""
    text = "\n".join(p.read_text() for p in sorted((ROOT / "csrc" / "cuda").glob("*.cu*"))
                     if not p.stem.endswith("_selftest"))
    return re.sub(r"//[^\n]*|/\*.*?\*/", "", text, flags=re.S)


def _statements(src: str, name: str, qualifier: str) -> list[str]:
    """The top-level statements of the body of the function `name` declared `qualifier`."""
    head = re.search(qualifier + r"\b[^;{]*?\b" + name + r"\s*\(", src)
    assert head, f"{qualifier} {name} not found"
    i = src.index("{", head.end())  # no braces in the parameter lists
    depth, start, out = 0, i + 1, []
    for j in range(i, len(src)):
        c = src[j]
        if c in "{}":
            depth += 1 if c == "{" else -1
            if depth == 0:
                return out
        elif c == ";" and depth == 1:
            out.append(" ".join(src[start:j].split()))
        if c in "{};" and depth == 1:
            start = j + 1
    raise AssertionError(f"unbalanced braces in {name}")


def test_every_kernel_waits_for_the_kernel_before_it():
    """Every kernel is a programmatic dependent launch on sm_90+ (csrc/cuda/pdl.cuh): it may start
    while the kernel before it in the stream runs, so before it touches global memory it must wait
    for that kernel (wait_for_prior_grids). A kernel without the wait reads stale inputs or
    overwrites live ones, and only now and then, on a GPU: this checks the sources instead. Only
    declarations may come first; a kernel whose body is one call checks the function it calls."""
    src = re.sub(r"__launch_bounds__\((?:[^()]|\([^()]*\))*\)", "", _kernel_sources())
    kernels = sorted(set(re.findall(r"__global__\s+void\s+(\w+)\s*\(", src)))
    assert len(kernels) >= 9, kernels  # the gate's three kinds, the dispatch kernels
    for kernel in kernels:
        body = _statements(src, kernel, "__global__")
        if len(body) == 1:  # topk_gate_kernel and the statistics build call topk_gate_body
            callee = re.fullmatch(r"(\w+)\s*(?:<[^;]*>)?\s*\(.*\)", body[0])
            assert callee, f"{kernel}: {body[0]}"
            body = _statements(src, callee.group(1), "__device__")
        first = next(s for s in body
                     if not re.match(r"(static_assert|constexpr|extern __shared__|using)\b", s))
        assert first == "wait_for_prior_grids()", f"{kernel} starts with {first!r}"

def test_info_reports_the_extension():
    info = moe_route.info()
    json.dumps(info)  # plain data, usable in bug reports
    assert info["moe_route"] == moe_route.__version__
    assert info["torch"] == torch.__version__
    if not HAS_CPU_KERNEL:
        pytest.skip(f"extension not loaded: {info['extension_error']}")
    assert info["extension_loaded"] is True and info["extension_error"] is None
    assert "cpu" in info["kernels"]["topk_gate"]
    assert ("cuda" in info["kernels"]["topk_gate"]) == moe_route._loader.has_kernel("topk_gate",
                                                                                     "cuda")
    assert torch.__version__.startswith(info["build"]["native"]["torch_version"])
    # setup.py's OpenMP decision is the one the binary was compiled with
    if "openmp" in info["build"]:
        assert info["build"]["native"]["openmp"] == info["build"]["openmp"]
    # compares and shuffles split into 16-byte pieces only where the baseline is all there is
    if info["build"]["native"]["split_vectors"]:
        assert info["cpu_isas"] == ["base"], info["cpu_isas"]
    assert info["cpu_threads"] == torch.get_num_threads()
    assert hasattr(torch.ops.moe_route, "topk_gate")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF dynamic section")
def test_extension_shares_torchs_cpp_runtime():
    """The extension links libstdc++ as a shared library, the one torch runs on, and holds no
    copy of its own: a static copy (the H200 image's g++ links one) crashed the process on every
    error message the extension wrote, instead of raising."""
    if not HAS_CPU_KERNEL:
        pytest.skip("extension not loaded")
    try:
        dynamic = subprocess.run(["readelf", "-dW", moe_route._loader.native.__file__],
                                 capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"readelf: {exc}")
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dynamic)
    assert "libstdc++.so.6" in needed, needed
    with pytest.raises(ValueError, match=r"ids must have k >= 1 columns, got shape \(2, 0\)"):
        torch.ops.moe_route.dispatch_plan(torch.zeros(2, 0, dtype=torch.int64), 3, 1)


FALLBACK_SCRIPT = """
    import json, torch, moe_route
    from moe_route import reference as R
    assert not torch.cuda.is_initialized()
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(0))
    bias = torch.randn(16, generator=torch.Generator().manual_seed(1))
    stats = moe_route.GateStats.zeros(1, 16, coact=True)
    steer = moe_route.SteerSpec(add={3: 2.0}, force={5: 1})
    w, ids = moe_route.topk_gate(x, 4, score="sigmoid", selection_bias=bias, steer=steer,
                                 stats=stats, renormalize=True)
    rw, rids = R.topk_gate(x, 4, score="sigmoid", selection_bias=bias, steer=steer.table(16),
                           renormalize=True)
    assert torch.equal(ids, rids) and torch.equal(w, rw)
    assert int(stats.tokens[0]) == 40 and int(stats.counts.sum()) == 160
    assert bool((ids[:, 0] == 5).all())
    info = moe_route.info()
    print(json.dumps(dict(loaded=info["extension_loaded"], error=info["extension_error"],
                          kernels=info["kernels"], has_op=hasattr(torch.ops.moe_route,
                                                                  "topk_gate"))))
"""


# Whether "moe_route" is an ExpertsInterface implementation, and whether the registering finder
# is still waiting in sys.meta_path.
REGISTERED = """
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
from moe_route.nn.experts import _RegisterOnImport
print("moe_route" in ALL_EXPERTS_FUNCTIONS.keys(),
      any(isinstance(f, _RegisterOnImport) for f in sys.meta_path))
"""


@pytest.mark.parametrize("first, probe", [("", False), ("", True),
                                          ("import transformers.integrations.moe", False)])
def test_import_registers_the_experts_without_importing_transformers(first, probe):
    """``import moe_route`` leaves transformers unimported (about 2.5 s); "moe_route" is an
    ExpertsInterface implementation as soon as that interface is imported, even after a spec
    lookup that loaded nothing, and at once where transformers came first."""
    pytest.importorskip("transformers")
    code = f"""
import importlib.util, sys
{first}
import moe_route
print("transformers" in sys.modules)
if {probe}:
    importlib.util.find_spec("transformers.integrations.moe")
""" + REGISTERED
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    imported, registered = proc.stdout.split("\n", 1)
    assert imported == str(bool(first))
    assert registered.split() == ["True", "False"]


def test_no_extension_falls_back_to_reference():
    proc = run_python(FALLBACK_SCRIPT, MOE_ROUTE_NO_EXT="1")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["loaded"] is False
    assert "MOE_ROUTE_NO_EXT" in out["error"]
    assert out["kernels"] and all(devices == [] for devices in out["kernels"].values())
    # one warning per (op, device), saying why
    assert proc.stderr.count("runs the pure-PyTorch reference") == 1, proc.stderr
    assert "MOE_ROUTE_NO_EXT" in proc.stderr


def test_strict_mode_refuses_the_fallback():
    code = """
        import torch, moe_route
        try:
            moe_route.topk_gate(torch.randn(4, 8), 2)
        except RuntimeError as exc:
            print("RAISED", exc)
        else:
            print("NO ERROR")
    """
    proc = run_python(code, MOE_ROUTE_NO_EXT="1", MOE_ROUTE_STRICT="1")
    assert proc.returncode == 0, proc.stderr
    assert "RAISED" in proc.stdout, proc.stdout
    assert "MOE_ROUTE_STRICT" in proc.stdout and "topk_gate" in proc.stdout


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="extension not loaded")
def test_strict_mode_with_extension_is_silent():
    code = """
        import torch, moe_route
        w, ids = moe_route.topk_gate(torch.randn(4, 8), 2)
        print("OK", tuple(ids.shape), moe_route.info()["extension_loaded"])
    """
    proc = run_python(code, MOE_ROUTE_STRICT="1")
    assert proc.returncode == 0, proc.stderr
    assert "OK (4, 2) True" in proc.stdout
    assert "pure-PyTorch reference" not in proc.stderr


@pytest.mark.parametrize("offset, code", [(-10, 1), (3600, 0)])
def test_a_test_deadline_skips_the_rest_and_fails_the_run(offset, code):
    """MOE_ROUTE_TEST_DEADLINE (tests/conftest.py): past it, tests are skipped and the run fails
    with a count of them; before it, nothing changes."""
    import time

    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    env["MOE_ROUTE_TEST_DEADLINE"] = str(time.time() + offset)
    test = "tests/test_gpu_tune.py::test_a_change_whose_text_is_gone_is_refused"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == code, proc.stdout + proc.stderr
    if code:
        assert "1 skipped" in proc.stdout
        assert "1 tests not run: out of time: MOE_ROUTE_TEST_DEADLINE has passed" in proc.stdout
    else:
        assert "1 passed" in proc.stdout and "not run" not in proc.stdout
