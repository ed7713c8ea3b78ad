"""Peer servers for ``python -m loadtest peers``: the same archive served without TorchServe.

Baselines, not product: each peer is one small file that loads the archive's own handler (so the
model, the preprocessing and the answer JSON are exactly TorchServe's) behind another server.
"""
