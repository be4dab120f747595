"""A1111's Script base class and the registry of loaded scripts."""

from collections import namedtuple

AlwaysVisible = object()
ScriptClassData = namedtuple("ScriptClassData", ["script_class", "path", "basedir", "module"])
scripts_data: list = []


class Script:
    name = None
    section = None
    infotext_fields = None
    paste_field_names = None
    args_from = None
    args_to = None
    is_txt2img = False
    is_img2img = False

    def title(self):
        raise NotImplementedError

    def ui(self, is_img2img):
        pass

    def show(self, is_img2img):
        return True

    def process(self, p, *args):
        pass

    def process_before_every_sampling(self, p, *args, **kwargs):
        pass

    def process_batch(self, p, *args, **kwargs):
        pass

    def postprocess(self, p, processed, *args):
        pass
