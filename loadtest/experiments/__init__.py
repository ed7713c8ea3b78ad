"""TorchServe options tried against the shipped handler (docs/SERVING.md): each needs its own entry
point around the shipped handler, packed into an experiment archive; none of this is shipped."""
