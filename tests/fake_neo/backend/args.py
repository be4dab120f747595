"""backend/args.py (Neo): the global `dynamic_args` that the loader resets and rewrites from each file it
loads, and that engines read and write while encoding and sampling."""


class dynamic_args:  # noqa: N801 - Neo's name
    embedding_dir = None
    forge_unet_storage_dtype = None
    online_lora = False
    kontext = edit = nunchaku = klein = wan = pid = krea2 = False
    ref_latents: list = []
    concat_latent = None
    lq_latent = [None, None]
    context_handler = None
    loading_refiner = False

    @classmethod
    def reset(cls):
        if cls.loading_refiner:
            return
        cls.ref_latents.clear()
        cls.concat_latent = None
        cls.lq_latent = [None, None]
        cls.context_handler = None
