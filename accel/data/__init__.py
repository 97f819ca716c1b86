"""Datasets (tfds builders, array_record, no TensorFlow) and deterministic input pipelines.

`accel.data.input_pipeline.build(config)` is the entry point for the training loop.
"""
