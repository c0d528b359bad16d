"""Block streaming: keep a resident prefix of a model's blocks on the device, copy the rest in on demand.

``stream_model(model, device, StreamSettings(resident, prefetch, ...))`` is the usual entry (the model
lists its blocks with ``streamable_blocks()``); ``StreamingEngine`` works on any list of blocks run in a
fixed order. See ``engine`` for the schedule and ``host`` for the tiers.
"""

from .engine import StreamingEngine
from .host import HOST_TIERS, plan_tiers, trim_heap
from .settings import CopyTime, Step, StreamSettings
from .streaming import BlockModel, model_blocks, stream_model
from .tensors import HeldTensor, block_tensors

__all__ = [
    "HOST_TIERS",
    "BlockModel",
    "CopyTime",
    "HeldTensor",
    "Step",
    "StreamSettings",
    "StreamingEngine",
    "block_tensors",
    "model_blocks",
    "plan_tiers",
    "stream_model",
    "trim_heap",
]
