"""omegaconf (A1111 ships it): OmegaConf.load of an ldm config, reduced to what the source loader reads."""


class DictConfig(dict):
    def __getattr__(self, item):
        try:
            return self[item]
        except KeyError:
            raise AttributeError(item) from None

    def __setattr__(self, key, value):
        self[key] = value


class OmegaConf:
    loaded: list[str] = []

    @staticmethod
    def load(path):
        OmegaConf.loaded.append(str(path))
        return DictConfig(model=DictConfig(target="tinyldm.TinyLDM", params=DictConfig()))
