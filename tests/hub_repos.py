"""Local copies of the Hub datasets the loaders read, laid out as their repositories are (a
README whose YAML maps configs and splits to data files), read by the real ``datasets`` library:
so a loader's call (which config, which split) is checked against what ``datasets`` does with
that layout, without the network. The layouts are those of the dataset cards and of code
that loads them (2026-11):

* ``facebook/belebele``: a config per language (``eng_Latn``) with a ``test`` split; the
  ``legacy`` variant has one ``default`` config whose splits are the languages;
* ``openlanguagedata/flores_plus``: a config per language with ``dev`` and ``devtest`` splits;
* ``CohereLabs/Global-MMLU``: a config per language (``en``) with ``test`` and ``dev`` splits;
* ``CohereLabs/global-mgsm``: a config per language (``en``) with a ``test`` split.
"""
import json

import pytest


def write_repo(root, configs: dict):
    """A dataset repository at ``root``: ``configs`` is ``{config: {split: [rows]}}``."""
    lines = ["---", "configs:"]
    for config, splits in configs.items():
        lines += [f"- config_name: {config}", "  data_files:"]
        for split, rows in splits.items():
            path = f"data/{config}/{split}.jsonl"
            (root / "data" / config).mkdir(parents=True, exist_ok=True)
            (root / path).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n"
                                             for r in rows), encoding="utf-8")
            lines += [f"  - split: {split}", f"    path: {path}"]
    (root / "README.md").write_text("\n".join(lines + ["---", "stand-in", ""]), encoding="utf-8")
    return root


def datasets_serving(monkeypatch, tmp_path, repos: dict):
    """Points ``datasets.load_dataset(repo, ...)`` at the local copy ``repos[repo]`` (a
    repository the test did not write is not found, as on the Hub); returns the list of calls
    it received."""
    datasets = pytest.importorskip("datasets")
    real = datasets.load_dataset
    calls = []

    def load_dataset(repo, *args, **kwargs):
        calls.append((repo, *args, *(f"{k}={v}" for k, v in kwargs.items())))
        if repo not in repos:
            raise FileNotFoundError(f"no stand-in for {repo}")
        return real(str(repos[repo]), *args, cache_dir=str(tmp_path / "cache"), **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls
