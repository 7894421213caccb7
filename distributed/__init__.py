"""NeuroOptima across data-parallel ranks (installed as ``neurooptima.distributed``)."""
