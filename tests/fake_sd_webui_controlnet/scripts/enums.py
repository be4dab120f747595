"""scripts/enums.py: the model types DS uses."""

from enum import Enum


class ControlModelType(Enum):
    ControlNet = "ControlNet, Lvmin Zhang"
    T2I_Adapter = "T2I_Adapter, Chong Mou"
    IPAdapter = "IPAdapter, Hu Ye"
