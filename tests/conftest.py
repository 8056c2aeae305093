"""Shared fixtures and helpers for the moe_route test suite.

* markers: ``cuda`` (skipped without a CUDA device *and* a CUDA kernel in the extension) and
  ``slow`` (skipped unless ``MOE_ROUTE_SLOW=1``);
* ``MOE_ROUTE_TEST_DEADLINE`` (Unix time in seconds): tests that would start after it are
  skipped, and the run then fails and says how many, but still ends with its summary and JUnit
  XML, unlike a run killed by a time limit (``bench/gpu_check.sh`` sets it);
* ``device`` fixture: every kernel test runs on "cpu" and, on a GPU machine, on "cuda";
* hypothesis profiles ``ci`` (default when ``CI`` is set) and ``dev`` (``HYPOTHESIS_PROFILE=dev``);
* helpers to build inputs, run the native op next to the reference and compare the two.

Test modules import the helpers with ``from conftest import ...`` (pytest puts tests/ on sys.path).
"""
from __future__ import annotations

import math
import os
import time

import pytest
import torch

import moe_route
from moe_route import _loader
from moe_route import reference as R

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    settings = None

OP = torch.ops.moe_route.topk_gate if _loader.native is not None else None
STAT_NAMES = moe_route.GateStats.NAMES
INT_STATS = ("tokens", "counts", "coact")
FLOAT_STATS = ("prob_sum", "weight_sum", "entropy_sum")

HAS_CUDA = torch.cuda.is_available() and _loader.has_kernel("topk_gate", "cuda")
HAS_CPU_KERNEL = _loader.has_kernel("topk_gate", "cpu")

# Tolerances of the kernel against the reference (module docstring of moe_route.reference).
W_RTOL, W_ATOL = 1e-5, 1e-6          # weights
S_RTOL, S_ATOL = 1e-5, 1e-5          # float statistics (sums over many tokens)
SEL_RTOL, SEL_ATOL = 1e-5, 1e-6      # "near-tie" tolerance of selection values


# --------------------------------------------------------------------------------------------
# pytest configuration
# --------------------------------------------------------------------------------------------

def pytest_configure(config):
    _deadline()  # a malformed MOE_ROUTE_TEST_DEADLINE stops the run before any test
    config.addinivalue_line("markers", "cuda: needs a CUDA device and the CUDA extension")
    config.addinivalue_line("markers", "slow: long-running; skipped unless MOE_ROUTE_SLOW=1")
    # emitted by torch.library.opcheck's internals, not by moe_route
    config.addinivalue_line("filterwarnings",
                            "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def pytest_collection_modifyitems(config, items):
    run_slow = os.environ.get("MOE_ROUTE_SLOW", "").lower() not in ("", "0", "false", "no")
    skip_cuda = pytest.mark.skip(reason="no CUDA device or no CUDA kernel in moe_route._C")
    skip_slow = pytest.mark.skip(reason="slow test: set MOE_ROUTE_SLOW=1")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)


DEADLINE_VAR = "MOE_ROUTE_TEST_DEADLINE"
_OUT_OF_TIME = f"out of time: {DEADLINE_VAR} has passed"


def _deadline():
    value = os.environ.get(DEADLINE_VAR, "")
    try:
        return float(value) if value else None
    except ValueError:
        raise pytest.UsageError(
            f"{DEADLINE_VAR} must be a Unix time in seconds, got {value!r}") from None


def pytest_runtest_setup(item):
    deadline = _deadline()
    if deadline is not None and time.time() > deadline:
        pytest.skip(_OUT_OF_TIME)


# Counted where the reports arrive (the controller, under xdist).
_not_run = []


def pytest_runtest_logreport(report):
    if report.skipped and isinstance(report.longrepr, tuple) and \
            _OUT_OF_TIME in str(report.longrepr[2]):
        _not_run.append(report.nodeid)


def pytest_terminal_summary(terminalreporter):
    if _not_run:
        terminalreporter.write_line(f"{len(_not_run)} tests not run: {_OUT_OF_TIME}", red=True)


def pytest_sessionfinish(session, exitstatus):
    if _not_run and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


if settings is not None:
    settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True,
                              print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow,
                                                     HealthCheck.data_too_large])
    settings.register_profile("dev", max_examples=150, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow,
                                                     HealthCheck.data_too_large])
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE",
                                         "ci" if os.environ.get("CI") else "dev"))


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _restore_num_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def umask():
    """The process umask set to 0o027 for one test (restored after): the mode a plain create
    then gives (0o640 files, 0o750 directories) differs from mkstemp's 0o600 and mkdtemp's 0o700
    and from the common default umask 0o022's."""
    old = os.umask(0o027)
    try:
        yield 0o027
    finally:
        os.umask(old)


requires_native = pytest.mark.skipif(not HAS_CPU_KERNEL,
                                     reason=f"native extension not loaded: {_loader.load_error}")


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------

def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_logits(T, E, *, seed=0, dtype=torch.float32, device="cpu", std=2.0):
    """Gaussian logits (fp32 draw, then cast), ties only by chance of the dtype's rounding."""
    x = torch.randn(T, E, generator=gen(seed)) * std
    return x.to(dtype).to(device)


def tie_free_logits(T, E, *, seed=0, lo=-4.0, hi=4.0, device="cpu"):
    """fp32 rows that are random permutations of E distinct, evenly spaced values in [lo, hi]:
    no ties and no near-ties, for any monotone score and any score-preserving rounding."""
    g = gen(seed)
    base = torch.linspace(lo, hi, E) if E > 1 else torch.zeros(1)
    perm = torch.argsort(torch.rand(T, E, generator=g), dim=1)
    return base[perm].to(device)


def random_bias(E, *, seed=1, scale=0.5, device="cpu"):
    return (torch.randn(E, generator=gen(seed)) * scale).to(device)


def steer_table(kind: str, E: int, *, seed=2, device="cpu") -> tuple:
    """(table [4, E], select_only, std_unbiased) for a named steering pattern."""
    g = gen(seed)
    t = torch.zeros(4, E)
    picks = torch.randperm(E, generator=g)[: max(1, E // 8)]
    select_only, unbiased = False, False
    if kind == "add":
        t[0, picks] = 3.0
        t[0, picks[-1]] = -2.5
    elif kind == "std":
        t[1, picks] = 0.75
    elif kind == "std_unbiased":
        t[1, picks] = 0.75
        unbiased = True
    elif kind == "abs":
        t[2, picks] = -0.5
        t[2, picks[0]] = 1.5
    elif kind == "force":
        t[3, picks[0]] = 1.0
        if E > 2:
            t[3, picks[-1] if len(picks) > 1 else (picks[0] + 1) % E] = -1.0
    elif kind == "force_many":  # a third on (often more than k), a third off
        order = torch.randperm(E, generator=g)
        t[3, order[: E // 3]] = 1.0
        t[3, order[E // 3: 2 * E // 3]] = -1.0
    elif kind in ("mixed", "mixed_select_only"):
        t[0] = torch.randn(E, generator=g) * 0.5
        t[1, picks] = 0.5
        t[2, picks[:1]] = 0.25
        t[3, picks[0]] = 1.0
        select_only = kind == "mixed_select_only"
    elif kind != "none":
        raise ValueError(kind)
    if kind == "none":
        return None, False, False
    return t.to(device), select_only, unbiased


def group_config(E: int, k: int, kind: str):
    """(n_group, topk_group, group_score) for a named group pattern, or None if E/k cannot
    host it (n_group must divide E and k <= topk_group * E / n_group)."""
    if kind == "none":
        return 1, 1, "max"
    for n_group in (8, 4, 2):
        if E % n_group == 0 and E // n_group >= 1 and n_group < E:
            break
    else:
        return None
    per = E // n_group
    topk_group = max(1, min(n_group, -(-k // per)))
    topk_group = max(topk_group, min(n_group, n_group // 2))
    if k > topk_group * per:
        return None
    return n_group, topk_group, "max" if kind == "max" else "top2_sum"


def zero_stats(G, E, *, device="cpu", names=STAT_NAMES) -> dict:
    shapes = {"tokens": (G,), "counts": (G, E), "prob_sum": (G, E), "weight_sum": (G, E),
              "entropy_sum": (G,), "coact": (E, E)}
    return {n: torch.zeros(shapes[n], device=device,
                           dtype=torch.int64 if n in INT_STATS else torch.float32)
            for n in names}


def clone_stats(stats: dict) -> dict:
    return {n: (b.clone() if b is not None else None) for n, b in stats.items()}


# --------------------------------------------------------------------------------------------
# running and comparing
# --------------------------------------------------------------------------------------------

def run_op(logits, k, stats=None, **kw):
    return OP(logits, k, **kw, **(stats or {}))


def run_ref(logits, k, stats=None, **kw):
    """The reference on the CPU (inputs moved there), outputs back on the logits' device."""
    dev = logits.device
    cpu = lambda t: t.cpu() if isinstance(t, torch.Tensor) else t  # noqa: E731
    ref_stats = {n: cpu(b) for n, b in (stats or {}).items()}
    w, ids = R.topk_gate(cpu(logits), k, **{n: cpu(v) for n, v in kw.items()}, **ref_stats)
    if stats:
        for n, b in stats.items():
            if b is not None and b.device != torch.device("cpu"):
                b.copy_(ref_stats[n])
    return w.to(dev), ids.to(dev)


def selection_keys(logits, k, *, score="softmax", select_on="scores", selection_bias=None,
                   steer=None, std_unbiased=False, n_group=1, topk_group=1, group_score="max",
                   **_):
    """The reference's selection values v [T, E], tiers [T, E] and group scores [T, n_group]
    (None without groups), recomputed with the reference's own building blocks."""
    cpu = lambda t: t.cpu() if isinstance(t, torch.Tensor) else t  # noqa: E731
    z0 = R.sanitize(cpu(logits))
    z, tier = R.steer_logits(z0, cpu(steer), std_unbiased)
    v = R.selection_values(z, score, select_on, cpu(selection_bias))
    gscores = None
    if n_group > 1:
        T, E = v.shape
        gv = v.view(T, n_group, E // n_group)
        gscores = (gv.max(-1).values if group_score == "max"
                   else R.sanitize(gv.topk(min(2, E // n_group), dim=-1).values.sum(-1)))
    return v, tier, gscores


def _near(a, b, rtol, atol):
    return (a - b).abs() <= atol + rtol * torch.maximum(a.abs(), b.abs())


def assert_same_selection(ids, ref_ids, ref_values, *, tiers=None, group_scores=None,
                          topk_group=1, rtol=SEL_RTOL, atol=SEL_ATOL, max_exceptions=None):
    """Exact id equality, except in rows whose disagreement is explained by near-ties.

    A differing row is accepted if the kernel's ids are a valid selection (unique, in range) and
    at every differing position both experts have the same tier and reference selection values
    within ``atol + rtol * max(|a|, |b|)`` (an order swap or a swap at the k-th boundary), or if
    the reference's group scores are near-tied at the ``topk_group`` boundary (a group flip).
    Such rows must be rare: at most ``max_exceptions`` (default max(2, 2% of the rows)).

    Returns the boolean mask [T] of rows whose ids are exactly equal (compare weights there).
    """
    ids, ref_ids = ids.cpu().long(), ref_ids.cpu().long()
    assert ids.shape == ref_ids.shape, (ids.shape, ref_ids.shape)
    T, k = ids.shape
    same = (ids == ref_ids).all(1) if T else torch.ones(0, dtype=torch.bool)
    bad_rows = (~same).nonzero().flatten().tolist()
    if not bad_rows:
        return same
    v = ref_values.cpu().float()
    E = v.shape[1]
    if max_exceptions is None:
        max_exceptions = max(2, math.ceil(0.02 * T))
    problems = []
    for t in bad_rows:
        row = ids[t]
        if row.min() < 0 or row.max() >= E or row.unique().numel() != k:
            problems.append(f"row {t}: invalid ids {row.tolist()}")
            continue
        diff = (row != ref_ids[t]).nonzero().flatten()
        a, b = row[diff], ref_ids[t][diff]
        ok = bool(_near(v[t, a], v[t, b], rtol, atol).all())
        if tiers is not None:
            ok = ok and bool((tiers[t, a] == tiers[t, b]).all())
        if not ok and group_scores is not None:
            gs = group_scores[t].cpu().float().sort(descending=True).values
            if topk_group < gs.numel():
                ok = bool(_near(gs[topk_group - 1], gs[topk_group], rtol, atol))
        if not ok:
            problems.append(f"row {t}: ids {row.tolist()} != reference {ref_ids[t].tolist()} "
                            f"(values {v[t, a].tolist()} vs {v[t, b].tolist()})")
    assert not problems, "selection differs from the reference beyond near-ties:\n" + \
        "\n".join(problems[:10])
    assert len(bad_rows) <= max_exceptions, (
        f"{len(bad_rows)} of {T} rows differ from the reference at near-ties "
        f"(allowed {max_exceptions}): rows {bad_rows[:20]}")
    return same


def exact_selection_expected(score="softmax", select_on="scores", selection_bias=None, steer=None,
                             **_):
    """Whether the kernel must reproduce the reference's ids bit-exactly: selection on the
    (steered) logits themselves or on an exactly computed function of them."""
    if steer is not None and bool((steer[1] != 0).any()):
        return False  # the std term sums E logits in a backend-specific order
    if select_on == "logits":
        return True
    if score == "none":
        return True
    return score == "softmax" and selection_bias is None


def assert_gate_matches(out, ref, logits, k, *, exact=None, stats=None, ref_stats=None, **kw):
    """Compare (weights, ids) of the op with the reference's, and the statistics if given."""
    w, ids = out
    rw, rids = ref
    T = logits.shape[0]
    assert w.shape == (T, k) and ids.shape == (T, k)
    assert w.dtype == torch.float32 and ids.dtype == torch.int32
    assert w.device == logits.device and ids.device == logits.device
    if exact is None:
        exact = exact_selection_expected(**kw)
    if exact:
        assert torch.equal(ids.cpu(), rids.cpu()), _first_diff(ids, rids)
        rows = torch.ones(T, dtype=torch.bool)
    else:
        v, tiers, gs = selection_keys(logits, k, **kw)
        rows = assert_same_selection(ids, rids, v, tiers=tiers, group_scores=gs,
                                     topk_group=kw.get("topk_group", 1))
    torch.testing.assert_close(w.cpu()[rows], rw.cpu()[rows], rtol=W_RTOL, atol=W_ATOL)
    if stats is not None:
        assert bool(rows.all()), "statistics compared on an input with near-tie selections"
        assert_stats_equal(stats, ref_stats)


def assert_stats_equal(stats, ref_stats, rtol=S_RTOL, atol=S_ATOL):
    for name, buf in stats.items():
        ref = ref_stats[name]
        if buf is None:
            assert ref is None
            continue
        if name in INT_STATS:
            assert torch.equal(buf.cpu(), ref.cpu()), f"{name}: {_first_diff(buf, ref)}"
        else:
            torch.testing.assert_close(buf.cpu(), ref.cpu(), rtol=rtol, atol=atol,
                                       msg=lambda m, n=name: f"{n}: {m}")


def assert_same_stats(got, want, rtol=1e-5, atol=1e-6):
    """Two runs' statistics buffers (GateStats, or dicts by name) hold the same numbers: bit for
    bit, except the float sums on CUDA, which float atomics add in no fixed order (the README:
    their last bits can vary between runs), to ``rtol``/``atol``. Buffers left out (None) must be
    left out in both."""
    pairs = (zip(STAT_NAMES, got.buffers(), want.buffers()) if isinstance(got, moe_route.GateStats)
             else ((n, got[n], want[n]) for n in STAT_NAMES if n in got or n in want))
    for name, a, b in pairs:
        assert (a is None) == (b is None), name
        if a is None:
            continue
        if a.is_cuda and name in FLOAT_STATS:
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=name)
        else:
            assert torch.equal(a, b), name


def _first_diff(a, b):
    a, b = a.cpu(), b.cpu()
    if a.shape != b.shape:
        return f"shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    bad = (a != b).nonzero()
    if bad.numel() == 0:
        return "equal"
    idx = tuple(bad[0].tolist())
    row = idx[0]
    return (f"{len(bad)} elements differ; first at {idx}: row {row}: {a[row].tolist()} vs "
            f"reference {b[row].tolist()}")
