"""The model: cutting an ``nn.Sequential`` into stages, measuring its layers, moving layers' tensors between ranks,
parameters tied across stages, deferred (meta-device) construction, and checkpoints ported from torchgpipe."""
