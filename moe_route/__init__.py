"""moe_route: fused top-k gating, steering and routing statistics for Mixture-of-Experts models.

``import moe_route`` never fails and never initialises CUDA: without a working native extension
every op runs the pure-PyTorch reference (one warning per op and device; ``info()`` says why). It
does not import transformers (``moe_route.nn`` registers its experts implementation once
transformers' ExpertsInterface is imported).
"""
from moe_route import dispatch, ops, reference
from moe_route._info import info
from moe_route.dispatch import DispatchPlan, dispatch_plan, permute, unpermute
from moe_route.hf import UnsupportedModelError, patch, supported, unpatch
from moe_route.ops import GateStats, RouterSpec, SteerSpec, topk_gate
from moe_route.recording import Recorder, record
from moe_route.traces import Trace, load_trace, open_trace, save_trace
from moe_route.replaying import Replay, replay, trace_by_position
from moe_route.stats import LayerStats, RoutingStats
from moe_route.steering import SteerEntry, SteeringPlan, steer

__version__ = "0.1.0"

__all__ = ["topk_gate", "RouterSpec", "SteerSpec", "GateStats", "dispatch_plan", "permute",
           "unpermute", "DispatchPlan", "patch", "unpatch", "record", "Recorder", "Trace",
           "save_trace", "load_trace", "open_trace", "replay", "Replay", "trace_by_position",
           "steer", "SteeringPlan", "SteerEntry", "RoutingStats", "LayerStats", "supported",
           "UnsupportedModelError", "info", "ops", "dispatch", "reference"]
