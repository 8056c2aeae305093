"""bench/gpu_tune.py: its variants still match the kernel sources, and its timing and table run
(on the CPU here; the A/B builds themselves need a GPU machine)."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "bench" / "gpu_tune.py"
_spec = importlib.util.spec_from_file_location("gpu_tune", _PATH)
tune = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tune)


def _sources(tmp_path, variant):
    for rel, _, _ in variant.changes:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tune.ROOT / rel, tmp_path / rel)


@pytest.mark.parametrize("name", sorted(tune.VARIANTS))
def test_each_variant_changes_the_current_source(tmp_path, name):
    variant = tune.VARIANTS[name]
    _sources(tmp_path, variant)
    tune.apply_changes(tmp_path, variant.changes)
    texts = {rel: (tmp_path / rel).read_text() for rel, _, _ in variant.changes}
    for rel, old, new in variant.changes:
        assert texts[rel].count(new) == 1 and old not in texts[rel]
    for rel, old, new in variant.changes:  # nothing else changed
        texts[rel] = texts[rel].replace(new, old)
    assert all(text == (tune.ROOT / rel).read_text() for rel, text in texts.items())


def test_a_change_whose_text_is_gone_is_refused(tmp_path):
    variant = tune.VARIANTS["gate_keys64_before"]
    _sources(tmp_path, variant)
    tune.apply_changes(tmp_path, variant.changes)
    with pytest.raises(ValueError, match="0 copies"):  # applied twice: the text is gone
        tune.apply_changes(tmp_path, variant.changes)


def test_measure_and_table_on_cpu():
    names = ["gate T=64 E=256 k=8", "plan T=64 E=256 k=8 block=64"]
    results = tune.measure("cpu", names, min_time=0.01)
    assert list(results) == names
    assert all(r["median_us"] > 0 and r["method"] == "perf_counter" for r in results.values())
    slower = {n: dict(r, median_us=2 * r["median_us"]) for n, r in results.items()}
    table = tune.format_table({"base": results, "dispatch_alt": slower,
                               "gate_3_blocks": {"error": "build failed (exit 1)"}})
    lines = table.splitlines()
    assert "base" in lines[0] and "dispatch_alt" in lines[0] and "gate_3_blocks" not in lines[0]
    assert all("(2.00x)" in line for line in lines[2:4])
    assert lines[-1] == "gate_3_blocks: no timings (build failed (exit 1))"


def test_each_variant_names_the_kernels_it_changes():
    for name, variant in tune.VARIANTS.items():
        assert variant.kernels and set(variant.kernels) <= set(tune.KERNELS), name
        assert variant.changes or variant.env, name  # else it would time the base again
        if not variant.changes:
            continue
        files = {rel for rel, _, _ in variant.changes}
        assert ("dispatch" in variant.kernels) == any("dispatch" in f for f in files), name
        if "csrc/cuda/gate_wide.cuh" in files:
            assert "wide" in variant.kernels, name


def test_a_variant_is_timed_on_its_kernels_cases_only():
    wide = tune.cases_for(["wide_merge"])
    assert wide == ["gate topk_softmax T=1 E=16384 k=64", "gate topk_softmax T=1024 E=16384 k=64"]
    dispatch = tune.cases_for(["dispatch_alt"])
    assert dispatch and all(c.split()[0] in ("plan", "permute", "permute64", "unpermute")
                            for c in dispatch)
    warp = tune.cases_for(["gate_stats_exps_again"])
    assert "gate+stats deepseek_v3 T=16384" in warp and not set(warp) & set(wide + dispatch)
    both = tune.cases_for(["gate_exp_branches"])
    assert both == [c for c in tune.CASES if c in warp or c in wide]
    # the union, in CASES order
    assert tune.cases_for(["wide_merge", "dispatch_alt"]) == [
        c for c in tune.CASES if c in wide or c in dispatch]


def test_time_only_times_what_build_only_left(tmp_path):
    """--time-only reads the builds that --build-only recorded in --work: here one variant whose
    build failed, so the base alone is timed, first and last, on that variant's cases (CPU)."""
    work, out = tmp_path / "work", tmp_path / "out"
    args = [str(out), "--time-only", "--work", str(work), "--device", "cpu", "--min-time", "0.01"]
    assert tune.main(args) == 1  # nothing built yet
    work.mkdir()
    failed = {"error": "build failed (exit 1)"}
    (work / "builds.json").write_text(tune.json.dumps({
        "report": {"variants": {"wide_cache8": {"build_s": 3.0}},
                   "results": {"wide_cache8": failed}},
        "variants": ["wide_cache8"], "trees": {}}))
    assert tune.main(args) == 1  # the failed build is reported
    report = tune.json.loads((out / "gpu_tune.json").read_text())
    assert report["results"]["wide_cache8"] == failed
    for base in ("base", "base_again"):
        assert list(report["results"][base]) == tune.cases_for(["wide_cache8"])
    table = (out / "gpu_tune.txt").read_text()
    assert "wide_cache8: no timings (build failed (exit 1))" in table
    assert "gate topk_softmax T=1024 E=16384 k=64" in table and "plan" not in table


@pytest.mark.parametrize("phase", ["--build-only", "--time-only"])
def test_a_phase_needs_a_work_folder(tmp_path, phase, capsys):
    with pytest.raises(SystemExit):
        tune.main([str(tmp_path), phase])
    assert "need --work" in capsys.readouterr().err


def test_build_only_leaves_the_base_to_its_caller(tmp_path):
    """gpu_check.sh builds this tree in place while --build-only builds the variants: the
    latter must not start a second build of the same tree."""
    report = {"variants": {}, "results": {}}
    assert tune.build_variants([], tmp_path, tune.time.monotonic() + 60, "9.0a", report,
                               with_base=False) == {}
    assert report == {"variants": {}, "results": {}}


def test_an_environment_variant_times_the_base_build_with_its_variable(tmp_path, monkeypatch):
    """A variant without changes (no_pdl) is not copied or built: the base build is timed again,
    in a process that has the variant's environment variable, and the base's without it."""
    report = {"variants": {}, "results": {}}
    trees = tune.build_variants(["no_pdl"], tmp_path, tune.time.monotonic() + 60, "9.0a", report,
                                with_base=False)
    assert trees == {"no_pdl": tune.ROOT} and not list(tmp_path.iterdir())
    assert report["variants"]["no_pdl"]["env"] == (("MOE_ROUTE_PDL", "0"),)
    seen = {}

    def fake_measure(tree, out_json, cases, args, timeout, env=()):
        seen[out_json.name] = (tree, dict(env))
        return {}

    monkeypatch.setattr(tune, "_run_measure", fake_measure)
    tune.time_builds(trees, ["gate T=1 E=128 k=8"], tmp_path, None,
                     tune.time.monotonic() + 60, report)
    assert seen == {"base.times.json": (tune.ROOT, {}),
                    "no_pdl.times.json": (tune.ROOT, {"MOE_ROUTE_PDL": "0"}),
                    "base_again.times.json": (tune.ROOT, {})}


def test_a_measurement_runs_with_the_variants_environment(tmp_path):
    """_run_measure's process sees the variant's variable: a case it cannot find fails there
    with the variable named in the error, printed by a fake gpu_tune.py in the tree."""
    tree = tmp_path / "tree"
    (tree / "bench").mkdir(parents=True)
    (tree / "bench" / "gpu_tune.py").write_text(
        "import os, sys\nsys.exit('MOE_ROUTE_PDL=' + os.environ.get('MOE_ROUTE_PDL', 'unset'))\n")
    args = tune.argparse.Namespace(device="cpu", min_time=0.01)
    got = tune._run_measure(tree, tmp_path / "t.json", ["x"], args, 30, (("MOE_ROUTE_PDL", "0"),))
    assert got == {"error": "MOE_ROUTE_PDL=0"}
    assert tune._run_measure(tree, tmp_path / "t.json", ["x"], args, 30) == {
        "error": "MOE_ROUTE_PDL=unset"}


def _deps_text(temp: Path, root: Path) -> str:
    """``ninja -t deps`` as ninja 1.11 prints it, for a build of three sources in ``temp``."""
    return (f"{temp}/csrc/cuda/gate.o: #deps 3, deps mtime 1795717076244777245 (VALID)\n"
            f"    {root}/csrc/cuda/gate.cu\n    {root}/csrc/cuda/gate.cuh\n"
            f"    {root}/csrc/cuda/../gate_params.h\n\n"
            f"{temp}/csrc/cuda/dispatch.o: #deps 2, deps mtime 1795717076244777245 (VALID)\n"
            f"    {root}/csrc/cuda/dispatch.cu\n    {root}/csrc/gate_params.h\n\n"
            f"{temp}/csrc/cpu/gate.o: #deps 1, deps mtime 1795717076244777245 (STALE)\n"
            f"    {root}/csrc/cpu/gate.cpp\n\n")


def test_ninja_deps_are_read_per_object_and_stale_records_dropped(tmp_path):
    """Each object's files as real paths: a tree reached through a link, or a file named relative
    to the build folder, is still the tree's file."""
    temp = tmp_path / "build" / "temp.linux-x86_64-cpython-311"
    temp.mkdir(parents=True)
    (tmp_path / "tree").symlink_to(tune.ROOT)
    for root in (tune.ROOT, tmp_path / "tree", "../../tree"):
        deps = tune.parse_ninja_deps(_deps_text(temp, root), temp)
        assert deps == {
            "csrc/cuda/gate.o": {f"{tune.ROOT}/csrc/cuda/gate.cu",
                                 f"{tune.ROOT}/csrc/cuda/gate.cuh",
                                 f"{tune.ROOT}/csrc/gate_params.h"},
            "csrc/cuda/dispatch.o": {f"{tune.ROOT}/csrc/cuda/dispatch.cu",
                                     f"{tune.ROOT}/csrc/gate_params.h"}}


@pytest.mark.parametrize("changed, kept", [
    ({"csrc/cuda/gate.cuh"}, ["csrc/cuda/dispatch.o"]),
    ({"csrc/gate_params.h"}, []),
    ({"csrc/cuda/dispatch.cuh"}, ["csrc/cuda/dispatch.o", "csrc/cuda/gate.o"])])
def test_a_variant_links_the_objects_its_changes_do_not_reach(tmp_path, changed, kept):
    temp = tmp_path / "temp"
    deps = tune.parse_ninja_deps(_deps_text(temp, tune.ROOT), temp)
    for obj in deps:
        (temp / obj).parent.mkdir(parents=True, exist_ok=True)
        (temp / obj).write_bytes(obj.encode())
    dst = tmp_path / "variant.objects"
    assert tune.link_unchanged(deps, temp, changed, dst) == kept
    linked = sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*.o"))
    assert linked == kept
    assert all((dst / obj).read_bytes() == obj.encode() for obj in kept)


def test_only_a_cuda_build_for_the_same_arch_lends_its_objects(tmp_path):
    temp = tmp_path / "build" / f"temp.linux-x86_64-{tune.sys.implementation.cache_tag}"
    temp.mkdir(parents=True)
    (tmp_path / "moe_route").mkdir()
    info = tmp_path / "moe_route" / "_build_info.json"
    assert tune.base_temp("9.0a", tmp_path) is None  # never built
    info.write_text(tune.json.dumps({"cuda_built": True, "cuda_archs": "9.0a", "debug": False}))
    assert tune.base_temp("9.0a", tmp_path) is None  # no record of its files
    (temp / ".ninja_deps").write_bytes(b"")
    assert tune.base_temp("9.0a", tmp_path) == temp
    assert tune.base_temp("8.0", tmp_path) is None
    for other in ({"cuda_built": False, "cuda_archs": None, "debug": False},
                  {"cuda_built": True, "cuda_archs": "9.0a", "debug": True}):
        info.write_text(tune.json.dumps(other))
        assert tune.base_temp("9.0a", tmp_path) is None


def test_a_build_is_timed_only_from_its_own_tree(tmp_path):
    """``--measure`` refuses to time a moe_route imported from another tree than the script's
    (a variant would be timed as the base, or the base as a variant)."""
    case = ["--device", "cpu", "--min-time", "0.01", "--cases", "gate T=64 E=256 k=8"]
    # this tree's moe_route, whichever tree the installed package points to
    env = dict(os.environ, PYTHONPATH=str(tune.ROOT))
    ok = subprocess.run([sys.executable, str(tune.ROOT / "bench" / "gpu_tune.py"), "--measure",
                         str(tmp_path / "here.json"), *case], cwd=tune.ROOT, capture_output=True,
                        text=True, timeout=300, env=env)
    assert ok.returncode == 0, ok.stderr
    assert "median_us" in json.loads((tmp_path / "here.json").read_text())["gate T=64 E=256 k=8"]
    (tmp_path / "bench").mkdir()
    # a tree without its build
    shutil.copy(tune.ROOT / "bench" / "gpu_tune.py", tmp_path / "bench")
    other = subprocess.run([sys.executable, str(tmp_path / "bench" / "gpu_tune.py"), "--measure",
                            str(tmp_path / "there.json"), *case], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
    assert other.returncode == 1
    assert f"imported moe_route from {tune.ROOT / 'moe_route'}, not from this tree" in other.stderr
    assert not (tmp_path / "there.json").exists()
