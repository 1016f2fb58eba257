"""Networks: the backbone factory and its weights (:mod:`~cnmc.models.backbones`, :mod:`~cnmc.models.lite`),
per-layer learning rates, and :class:`~cnmc.inference.spec.ModelSpec`, what a trained model needs to be run.

``cnmc.models.lite`` imports a lite variant's weight package only when that backbone is built with
pretrained weights, so the package also imports where none is installed.
"""
