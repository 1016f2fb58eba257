"""Networks: the backbone factory and its weights (:mod:`~cnmc.models.backbones`, :mod:`~cnmc.models.lite`)
and per-layer learning rates (:mod:`~cnmc.models.param_groups`). What a trained model needs to be run,
:class:`~cnmc.inference.spec.ModelSpec`, is the inference package's.

``cnmc.models.lite`` imports a lite variant's weight package only when that backbone is built with
pretrained weights, so the package also imports where none is installed.
"""
