from modules.sd_samplers_common import SamplerData

CONFIGS = {"Euler": SamplerData("Euler"), "Heun": SamplerData("Heun", {"second_order": True}),
           "DPM++ 2M": SamplerData("DPM++ 2M"), "Euler a": SamplerData("Euler a"), "DDIM": SamplerData("DDIM"),
           "DDIM CFG++": SamplerData("DDIM CFG++")}


def find_sampler_config(name):
    return CONFIGS.get(name)


def create_sampler(name, model):
    from modules import sd_samplers_kdiffusion, sd_samplers_timesteps

    if name in ("DDIM", "DDIM CFG++"):
        return sd_samplers_timesteps.CompVisSampler("ddim_cfgpp" if name == "DDIM CFG++" else "ddim", model)
    return sd_samplers_kdiffusion.KDiffusionSampler(name, model)
