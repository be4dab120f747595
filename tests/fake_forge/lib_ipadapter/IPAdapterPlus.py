"""lib_ipadapter/IPAdapterPlus.py (Forge's built-in sd_forge_ipadapter): `IPAdapterApply().apply_ipadapter`
returns a 1-tuple holding a clone of the given UNet patcher with the IP-Adapter's attention patches."""

from lib_ipadapter import core


class IPAdapterApply:
    def apply_ipadapter(self, ipadapter, model, weight, clip_vision=None, image=None, weight_type="original",
                        noise=None, embeds=None, attn_mask=None, start_at=0.0, end_at=1.0, unfold_batch=False,
                        insightface=None, faceid_v2=False, weight_v2=False, instant_id=False):
        return (core.apply(ipadapter, model, weight, clip_vision, image, embeds, start_at, end_at, insightface),)
