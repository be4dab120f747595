"""lib_ipadapter/IPAdapterPlus.py (Neo): `apply_ipadapter` is a classmethod returning the patched clone itself."""

from lib_ipadapter import core


class IPAdapterApply:
    @classmethod
    def apply_ipadapter(cls, ipadapter, model, weight, clip_vision=None, image=None, weight_type="original",
                        noise=None, embeds=None, attn_mask=None, start_at=0.0, end_at=1.0, unfold_batch=False,
                        insightface=None, faceid_v2=False, weight_v2=False, instant_id=False):
        return core.apply(ipadapter, model, weight, clip_vision, image, embeds, start_at, end_at, insightface)
