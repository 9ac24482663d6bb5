"""dmriflow.models: PyTorch networks, training, checkpoints and model cards."""
