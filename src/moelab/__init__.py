"""moelab: Mixture-of-Experts research on Lightning + Hydra."""

__version__ = "0.1.0"


def load(path: str):
    """The trained model a moelab checkpoint holds (a `last.ckpt` file, or the sharded folder
    an fsdp/fsdp_ep run writes), built from the config the checkpoint carries, in eval mode."""
    from moelab.tasks.checkpoint_io import load_model

    return load_model(str(path), "checkpoint")
