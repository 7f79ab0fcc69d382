"""What a trained image classifier *is*: architectures, preprocessing and the artifact format.

Imported by both ``train`` and ``serve``; imports neither.
"""

__version__ = "0.1.0"
