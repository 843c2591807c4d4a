"""mmpretrain: pretrain CLIP/SigLIP-style image-text models at scale."""

__version__ = "0.1.0"
