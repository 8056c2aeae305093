"""bench/short_key_ties.py: the CUDA gate's short-key check, in numpy, on rows with known
answers."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

_spec = importlib.util.spec_from_file_location(
    "short_key_ties", Path(__file__).resolve().parents[1] / "bench" / "short_key_ties.py")
ties = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ties)


@pytest.mark.parametrize("E, bits", [(1, 5), (32, 5), (33, 6), (64, 6), (128, 7), (256, 8),
                                     (300, 9), (512, 9)])
def test_index_bits_follow_the_vpt_tiers(E, bits):
    assert ties.index_bits(E) == bits  # gate.cuh: short_index_bits(vpt_for(E))


def test_order_bits_rank_floats_and_tie_zeros():
    v = np.array([-np.inf, -2.0, -0.0, 0.0, 1e-30, 3.0], dtype=np.float32)
    o = ties.order_bits(v)
    assert list(np.argsort(o, kind="stable")) == [0, 1, 2, 3, 4, 5]
    assert o[2] == o[3] == 0x80000000


def _sent_back(v, k, tier_bits=0):
    """The fraction of rows of ``v`` that the check sends back to 64-bit keys."""
    return ties.rerun_rate(v, k, tier_bits)[0]


def _near_tie_row(E, k, offset_ulps):
    """Distinct values 1 apart; the k-th and (k+1)-th best then moved within ``offset_ulps``."""
    row = np.arange(E, dtype=np.float32)[::-1].copy()  # expert e holds E - 1 - e
    bits = row.view(np.uint32)
    bits[k] = bits[k - 1] + np.uint32(offset_ulps)  # (k+1)-th best now just above the k-th
    return row[None, :]


def test_a_near_tie_at_the_cut_is_sent_back_and_a_clear_row_is_not():
    E, k = 64, 8
    assert _sent_back(_near_tie_row(E, k, 3), k) == 1.0  # 6 dropped bits: a tie
    assert _sent_back(_near_tie_row(E, k, 1 << 8), k) == 0.0  # apart in the top bits
    assert _sent_back(np.arange(E, dtype=np.float32)[None, ::-1], k) == 0.0


def test_exact_ties_of_values_that_lose_nothing_are_not_sent_back():
    row = np.full((1, 64), 0.5, dtype=np.float32)  # all equal, low bits 0: the index decides
    assert _sent_back(row, 8) == 0.0
    assert _sent_back(-row, 8) == 0.0  # negative: dropped bits all 1 in the image
    row[0, 3] = np.nextafter(np.float32(0.5), np.float32(1))  # one ulp: loses bits, ties
    assert _sent_back(row, 8) == 1.0


def test_the_tier_bits_cost_resolution():
    row = _near_tie_row(64, 8, 1 << 7)  # apart in bit 7: kept with 6 dropped bits, not with 8
    assert _sent_back(row, 8, tier_bits=0) == 0.0
    assert _sent_back(row, 8, tier_bits=2) == 1.0


def test_a_full_build_checks_only_the_values_in_the_ties_span():
    """Whole numbers tie on their top bits (and lose nothing); one value with more bits (a steered
    expert) sends the row back in a full build only where its top bits fall in the span of those
    ties, and in a plain build wherever it is."""
    k = 6
    row = np.arange(64, dtype=np.float32)[None, ::-1].copy()  # expert e holds 63 - e
    row[0, 1], row[0, 4] = 63.0, 60.0  # ties at 63 (experts 0, 1) and 60 (experts 3, 4)
    assert _sent_back(row, k, tier_bits=2) == 0.0  # exact ties: the index decides
    assert _sent_back(row, k) == 0.0

    def with_value(v):
        out = row.copy()
        out[0, 40] = np.float32(v)
        return out

    below = with_value(10 + 2 ** -16)  # loses bits, below the span
    assert _sent_back(below, k, tier_bits=2) == 0.0
    assert _sent_back(below, k) == 1.0  # the plain builds check the whole row
    assert _sent_back(with_value(60 + 2 ** -16), k, tier_bits=2) == 1.0  # in a tie
    assert _sent_back(with_value(61.5 + 2 ** -16), k, tier_bits=2) == 1.0  # in the span


def test_only_the_tied_positions_take_a_round():
    """resolve_short_ties: a round per selection whose key ties with the one before or after it,
    the (k+1)-th key counting as after."""
    assert ties.rerun_rate(_near_tie_row(64, 8, 3), 8) == (1.0, 1.0)  # the k-th with the (k+1)-th
    k = 6
    row = np.arange(64, dtype=np.float32)[None, ::-1].copy()
    row[0, 1], row[0, 4] = 63.0, 60.0
    row[0, 40] = np.float32(61.5 + 2 ** -16)  # in the span: 63, 63, 61.5, 61, 60, 60 | 58
    assert ties.rerun_rate(row, k, tier_bits=2) == (1.0, 4.0)
    row[0, 5] = 60.0  # the 7th best ties with the 5th and 6th: the same 4 positions
    assert ties.rerun_rate(row, k, tier_bits=2) == (1.0, 4.0)
    assert ties.rerun_rate(np.zeros((1, 64), np.float32), k) == (0.0, 0.0)  # none sent back


def test_past_32_selections_every_one_from_the_32nd_takes_a_round():
    k = 40

    def near_tie(e):  # expert e moved 3 ulps above expert e - 1 (6 dropped bits): a tie
        row = np.arange(64, dtype=np.float32)[None, ::-1].copy()  # expert e holds 63 - e
        row.view(np.uint32)[0, e] = row.view(np.uint32)[0, e - 1] + np.uint32(3)
        return row

    assert ties.rerun_rate(near_tie(35), k) == (1.0, 9.0)  # selections 34, 35: 31 to 39 again
    assert ties.rerun_rate(near_tie(1), k) == (1.0, 2.0)  # selections 0 and 1 only
