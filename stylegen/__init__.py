"""stylegen: distributed training of feed-forward style transfer at 64x64."""

__version__ = "0.1.0"
