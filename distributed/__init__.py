"""NeuroOptima across data-parallel ranks (installed as ``neurooptima.distributed``)."""

from .comm_accounting import CommCounter, count_communication
from .sharded import ShardedNeuroOptima
