"""Smoke checks of bench/replay_speed.py (run by CI with the bench suite): each compared pair
computes the same replayed routing and statistics, else its ratio would mean nothing."""
import pytest
import torch

import replay_speed


@pytest.mark.parametrize("semantics,E,k", [("softmax_topk", 64, 8), ("topk_softmax", 64, 4),
                                           ("deepseek_v3", 256, 8)])
def test_replay_pair_computes_the_same(semantics, E, k):
    fns = replay_speed.callables(semantics, 33, E, k, "cpu")
    gw, gids = fns["gate+replay"]()
    tw, tids = fns["torch"]()
    assert torch.equal(gids.long(), tids)
    torch.testing.assert_close(gw, tw, rtol=1e-5, atol=1e-6)
    sw, sids, gstats = fns["gate+replay+st"]()
    bw, bids, tstats = fns["torch+st"]()
    assert torch.equal(sids.long(), bids)
    for a, b, name in zip(gstats.buffers(), tstats.buffers(), gstats.NAMES):
        if a is not None:
            torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-5, atol=1e-5, msg=name)
