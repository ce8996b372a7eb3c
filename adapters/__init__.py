"""Framework adapters, imported as ``matfactor.adapters`` (never as a top-level ``adapters``).

This package maps framework objects (torch ``nn.Linear`` and ``Conv2d`` layers, Hugging Face
blocks, calibration hooks) onto the matrix problems of the core. The core never imports it.
It holds no adapter yet: they arrive with the model-level issues.
"""
