"""deepfake: tell AI-generated images from real photographs, at scale, and show why."""

__version__ = "0.1.0"
