"""Experiment: TorchServe's micro-batching (ts/handler_utils/micro_batching.py) around the shipped handler.

The worker splits each batch into micro-batches and runs preprocess, inference and postprocess in
their own threads, so that decoding one micro-batch overlaps the model run of the previous one.
Packed next to ``cifar10_handler.py`` (imported from the worker's model_dir); model-config key
``micro_batching: {micro_batch_size: N, parallelism: {preprocess: P, inference: I, postprocess: Q}}``.
"""
from typing import Any

from cifar10_handler import Cifar10Handler
from ts.handler_utils.micro_batching import MicroBatching


class MicroBatchingCifar10Handler(Cifar10Handler):
    def initialize(self, context: Any) -> None:
        super().initialize(context)
        config = (getattr(context, "model_yaml_config", None) or {}).get("micro_batching", {})
        self.micro_batching = MicroBatching(self, micro_batch_size=int(config.get("micro_batch_size", 1)),
                                            parallelism=config.get("parallelism"))

    def handle(self, data: list[dict], context: Any) -> list[Any]:
        return self.micro_batching(data, context)
