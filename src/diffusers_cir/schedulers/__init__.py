from .scheduling_compodiff import CompoDiffScheduler

__all__ = ["CompoDiffScheduler"]
