"""lookalike: image instance retrieval and recognition.

The pipeline stages are modules named after what they do::

    images -> extract -> index -> search -> (rerank / verify) -> results
                              evaluate, cli beside them

Importing the package is cheap and has no side effects; each stage imports its heavy
dependencies (torch, faiss, onnxruntime) itself.
"""

from __future__ import annotations

from lookalike.errors import LookalikeError

__version__ = "0.1.0"

__all__ = ["LookalikeError", "__version__"]
