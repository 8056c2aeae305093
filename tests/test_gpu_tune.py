"""bench/gpu_tune.py: its variants still match the kernel sources, and its timing and table run
(on the CPU here; the A/B builds themselves need a GPU machine)."""
import importlib.util
import shutil
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
