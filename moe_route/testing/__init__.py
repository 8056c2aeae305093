"""Models and data with a known routing answer, for testing analyses without real weights.

``planted_model()`` builds a tiny real ``OlmoeForCausalLM`` whose embeddings, routers and experts
are constructed so that its routing is known by design (language-specific in early and late
layers, shared across languages in the middle, planted task experts), with a synthetic parallel
corpus, task and baseline data, the planted answer (``truth``) and an accuracy whose value depends
on routing to the task experts. See ``moe_route.testing.planted``.

Importing this package does not import ``transformers``; building a model does.
"""
from moe_route.testing.planted import PlantedModel, PlantedTruth, planted_model

__all__ = ["planted_model", "PlantedModel", "PlantedTruth"]
