"""modules/safe.py: A1111's restricted unpickler (its allowlist, written from the 1.10.1 source). A1111 also
replaces torch.load with a checked load unless --disable-safe-unpickle; the fakes leave torch.load alone."""

import _codecs
import collections
import pickle

import numpy
import torch

TypedStorage = torch.storage.TypedStorage


def encode(*args):
    return _codecs.encode(*args)


class RestrictedUnpickler(pickle.Unpickler):
    extra_handler = None

    def persistent_load(self, saved_id):
        assert saved_id[0] == "storage"
        return TypedStorage(_internal=True)

    def find_class(self, module, name):
        if self.extra_handler is not None:
            res = self.extra_handler(module, name)
            if res is not None:
                return res
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name in ["_rebuild_tensor_v2", "_rebuild_parameter",
                                                 "_rebuild_device_tensor_from_numpy"]:
            return getattr(torch._utils, name)
        if module == "torch" and name in ["FloatStorage", "HalfStorage", "IntStorage", "LongStorage",
                                          "DoubleStorage", "ByteStorage", "float32", "BFloat16Storage"]:
            return getattr(torch, name)
        if module == "numpy.core.multiarray" and name in ["scalar", "_reconstruct"]:
            return getattr(numpy.core.multiarray, name)
        if module == "numpy" and name in ["dtype", "ndarray"]:
            return getattr(numpy, name)
        if module == "_codecs" and name == "encode":
            return encode
        if module == "pytorch_lightning.callbacks.model_checkpoint" and name == "ModelCheckpoint":
            import pytorch_lightning.callbacks.model_checkpoint

            return pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint
        if module == "__builtin__" and name == "set":
            return set
        raise Exception(f"global '{module}/{name}' is forbidden")
