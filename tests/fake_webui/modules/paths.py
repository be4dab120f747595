"""modules/paths.py: the WebUI's folders (tests point models_path at their tmp folder)."""

import os

models_path = os.path.join(os.path.dirname(__file__), "..", "models")
