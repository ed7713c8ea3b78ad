"""Training stage: the CIFAR-10 ResNet18, its data and its recipe."""
