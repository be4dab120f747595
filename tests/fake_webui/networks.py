"""The built-in Lora extension's `networks` registry (A1111 extensions-builtin/Lora/networks.py)."""

import os

available_networks: dict = {}
available_network_aliases: dict = {}
available_network_hash_lookup: dict = {}


class NetworkOnDisk:
    def __init__(self, name, filename, shorthash=None):
        self.name, self.filename, self.alias = name, filename, name
        self.is_safetensors = os.path.splitext(filename)[1].lower() == ".safetensors"
        self.hash = self.shorthash = None
        if shorthash:
            self.set_hash(shorthash)

    def set_hash(self, v):
        self.hash = v
        self.shorthash = self.hash[0:12]
        available_network_hash_lookup[self.shorthash] = self

    def read_hash(self):
        pass


def register(name, filename, shorthash=None):
    entry = NetworkOnDisk(name, filename, shorthash)
    available_networks[name] = entry
    available_network_aliases[name] = entry
    return entry


def list_available_networks():
    pass
