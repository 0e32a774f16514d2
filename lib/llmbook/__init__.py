"""llmbook: the shared code of a runnable companion on fine-tuning and aligning LLMs.

Chapters import modules by name, e.g. ``from llmbook import models, train``.
Importing the package is cheap; heavy libraries load when a module needs them.
"""

__version__ = "0.1.0"
