"""Entry points that train real models with NeuroOptima (``launch/train.py``) and their data and
models (``launch.data``, ``launch.models``)."""
