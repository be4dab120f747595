"""modules_forge/supported_preprocessor.py: `PreprocessorClipVision.load_clipvision()` loads (Forge would
first download) its CLIP vision file once, shared by every preprocessor naming that file."""

from backend.patcher import clipvision


class PreprocessorClipVision:
    global_cache = {}

    def __init__(self, name, url, filename):
        self.name, self.url, self.filename = name, url, filename
        self.clipvision = None
        self.loads = 0

    def load_clipvision(self):
        if self.clipvision is None:
            if self.filename not in PreprocessorClipVision.global_cache:
                self.loads += 1
                PreprocessorClipVision.global_cache[self.filename] = clipvision.load(self.filename)
            self.clipvision = PreprocessorClipVision.global_cache[self.filename]
        return self.clipvision
