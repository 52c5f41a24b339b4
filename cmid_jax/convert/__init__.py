"""PyTorch conversion both ways: export of backbones (timm / torchvision / mmseg layouts), import of
official CMID checkpoints, the official full-checkpoint layout, and N-band stem adaptation."""


def require_torch(purpose: str):
    """The `torch` module; an ImportError saying what needs it when PyTorch is not installed."""
    try:
        import torch  # pylint: disable=import-outside-toplevel
    except ImportError as err:
        raise ImportError(
            f'{purpose} needs PyTorch (pip install torch); a .safetensors file '
            'needs only the safetensors package'
        ) from err
    return torch
