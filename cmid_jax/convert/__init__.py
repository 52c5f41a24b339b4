"""PyTorch conversion both ways: export of backbones (timm / torchvision / mmseg layouts), import of
official CMID checkpoints, the official full-checkpoint layout, and N-band stem adaptation."""
