"""vitfood: fine-tune Hugging Face image classifiers with a plain PyTorch loop."""

__version__ = "0.1.0"
