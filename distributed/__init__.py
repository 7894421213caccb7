"""NeuroOptima across data-parallel ranks (installed as ``neurooptima.distributed``).

- ``ShardedNeuroOptima``: ZeRO-style sharded state with built-in gradient synchronization, and
  ``ShardedGradScaler``, the loss scaler that goes with it.
- ``for_fsdp`` / ``materialize_state``: NeuroOptima on FSDP1 / FSDP2 models.
- ``save_checkpoint`` / ``load_checkpoint`` / ``sharded_state_dict``: sharded checkpoints that
  reshard to another world size.
- ``count_communication``: bytes each collective moves, per step.

The DeepSpeed adapter lives in ``neurooptima.distributed.deepspeed`` (it imports deepspeed).
"""

from .amp import ShardedGradScaler
from .checkpoint import load_checkpoint, save_checkpoint, sharded_state_dict
from .collectives import CollectiveError
from .comm_accounting import CommCounter, count_communication
from .fsdp import for_fsdp, materialize_state
from .sharded import ShardedNeuroOptima

__all__ = ["ShardedNeuroOptima", "ShardedGradScaler", "for_fsdp", "materialize_state",
           "save_checkpoint", "load_checkpoint", "sharded_state_dict", "CollectiveError",
           "CommCounter", "count_communication"]
