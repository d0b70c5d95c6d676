"""The embedded default model: built from pip-shipped weights, no model hub needed."""

from omni_serve.default.build import MODEL_NAME, build_default, default_model_dir

__all__ = ["MODEL_NAME", "build_default", "default_model_dir"]
