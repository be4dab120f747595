"""lib_ipadapter/IPAdapterPlus.py (Neo): `apply_ipadapter` is a classmethod returning the patched clone itself;
it keeps its state on the class (the last adapter's weight, flags and modules), as Neo's does."""

from lib_ipadapter import core


class IPAdapterApply:
    @classmethod
    def apply_ipadapter(cls, ipadapter, model, weight, clip_vision=None, image=None, weight_type="original",
                        noise=None, embeds=None, attn_mask=None, start_at=0.0, end_at=1.0, unfold_batch=False,
                        insightface=None, faceid_v2=False, weight_v2=False, instant_id=False):
        cls.weight = weight
        cls.is_sdxl = ipadapter["ip_adapter"]["1.to_k_ip.weight"].shape[1] == 2048
        work_model = core.apply(ipadapter, model, weight, clip_vision, image, embeds, start_at, end_at, insightface)
        cls.ipadapter = work_model.model_options["transformer_options"]["patches_replace"]["attn2"][("input", 1)]
        return work_model
