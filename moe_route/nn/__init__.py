"""Drop-in modules: ``TopKRouter``, ``SparseMoE`` (router + experts + dispatch + combine) and the
``"moe_route"`` experts implementation, which importing this package registers with transformers'
``ExpertsInterface`` (when transformers is installed: at once if it is imported, else as soon as
the interface is)."""
from moe_route.nn import experts
from moe_route.nn.router import TopKRouter
from moe_route.nn.sparse_moe import Experts, SparseMoE

experts.register_on_import()

__all__ = ["Experts", "SparseMoE", "TopKRouter", "experts"]
