"""What goes into the model archive: the TorchServe handler, which imports nothing from the project."""
