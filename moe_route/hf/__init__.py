"""transformers integration: router adapters (one per routing-semantics group) and ``patch``."""
from moe_route.hf.adapters import Adapter, UnsupportedModelError, adapter_for, register_adapter
from moe_route.hf.patch import PatchHandle, find_routers, patch, unpatch

__all__ = ["Adapter", "PatchHandle", "UnsupportedModelError", "adapter_for", "find_routers",
           "patch", "register_adapter", "unpatch"]
from moe_route.hf.families import FAMILIES, family_status, supported  # noqa: E402

__all__ += ["FAMILIES", "family_status", "supported"]
