"""Export stage: turn a training checkpoint into verified, self-describing TorchServe model archives.

``python -m export`` writes TorchScript, ONNX fp32 and two ONNX INT8 variants, checks each against
the checkpoint's own fp32 model on real CIFAR-10 images, benchmarks them on the CPU, and packs the
accepted ones with torch-model-archiver.
"""
