"""vlpl: multi-label image recognition from incomplete labels with vision-language pseudo-labels."""
__version__ = "0.1.0"
