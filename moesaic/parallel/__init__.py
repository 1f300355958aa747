"""Expert parallelism: layout of experts over ranks (no collectives in ``layout``)."""
from .layout import ExpertLayout, expert_layout

__all__ = ["ExpertLayout", "expert_layout"]
