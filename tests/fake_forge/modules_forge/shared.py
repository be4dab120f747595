"""modules_forge/shared.py: the preprocessor registry that built-in extensions fill at start-up."""

import os

from modules import paths

preprocessor_dir = os.path.join(paths.models_path, "ControlNetPreprocessor")
supported_preprocessors = {}
supported_control_models = []


def add_supported_preprocessor(preprocessor):
    supported_preprocessors[preprocessor.name] = preprocessor
