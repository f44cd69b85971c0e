"""p2ch: LUNA16 lung-nodule candidate classification (Deep Learning with PyTorch, part 2)."""

__version__ = "0.1.0"
