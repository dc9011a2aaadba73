"""Data structures on the device: the replay that stores each frame once, prioritised replay on
sum trees, frame stacks for acting, and image augmentations."""
