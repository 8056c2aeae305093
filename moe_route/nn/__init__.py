"""Drop-in modules. Importing this package registers the ``"moe_route"`` experts implementation
with transformers' ``ExpertsInterface`` (when transformers is installed)."""
from moe_route.nn import experts

experts.register()

__all__ = ["experts"]
