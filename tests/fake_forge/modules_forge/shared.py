"""modules_forge/shared.py: the preprocessor registry that built-in extensions fill at start-up."""

supported_preprocessors = {}
supported_control_models = []


def add_supported_preprocessor(preprocessor):
    supported_preprocessors[preprocessor.name] = preprocessor
