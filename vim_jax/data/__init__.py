"""Input pipelines: sources, augmentation, batching."""
