"""backend/modules/k_prediction.py: the predictor an engine's KModel carries (eps, v, or 'const' flow):
its sigma table and the input / output scalings of apply_model."""

import torch


class Prediction(torch.nn.Module):
    def __init__(self, sigmas, prediction_type="epsilon", multiplier=1000.0):
        super().__init__()
        self.prediction_type = prediction_type
        self.multiplier = multiplier
        self.register_buffer("sigmas", sigmas.float(), persistent=False)
        self.register_buffer("log_sigmas", sigmas.float().log(), persistent=False)

    @property
    def sigma_min(self):
        return self.sigmas[0]

    @property
    def sigma_max(self):
        return self.sigmas[-1]

    def set_sigmas(self, sigmas):
        self.sigmas, self.log_sigmas = sigmas.float(), sigmas.float().log()

    def timestep(self, sigma):
        if self.prediction_type == "const":
            return sigma * self.multiplier
        dists = sigma.log()[:, None] - self.log_sigmas[None]
        low = dists.ge(0).cumsum(1).argmax(1).clamp(max=self.log_sigmas.shape[0] - 2)
        lo, hi = self.log_sigmas[low], self.log_sigmas[low + 1]
        w = ((lo - sigma.log()) / (lo - hi)).clamp(0, 1)
        return (1 - w) * low + w * (low + 1)

    def sigma(self, timestep):
        t = timestep.float().clamp(0, self.log_sigmas.shape[0] - 1)
        low, w = t.floor().long(), t.frac()
        high = (low + 1).clamp(max=self.log_sigmas.shape[0] - 1)
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()

    def percent_to_sigma(self, percent):
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        return self.sigma(torch.tensor((1.0 - percent) * 999.0)).item()

    def calculate_input(self, sigma, x):
        return x if self.prediction_type == "const" else x / (sigma**2 + 1) ** 0.5

    def calculate_denoised(self, sigma, out, x):
        if self.prediction_type == "v_prediction":
            return x / (sigma**2 + 1) - out * sigma / (sigma**2 + 1) ** 0.5
        return x - out * sigma


def vp_sigmas(alphas_cumprod):
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def zero_terminal_snr(alphas_cumprod):
    """Lin et al.'s rescale (sqrt alpha_bar shifted to 0 at the end), last alpha clamped as the hosts do."""
    root = alphas_cumprod.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    out = root**2
    out[-1] = 4.8973451890853435e-08
    return out


def flow_sigmas(steps=1000):
    return torch.arange(1, steps + 1, dtype=torch.float32) / steps
