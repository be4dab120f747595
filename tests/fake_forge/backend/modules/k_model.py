"""backend/modules/k_model.py: KModel.apply_model(x, sigma, ...) -> x0 through an eps predictor."""

import torch


class KModel(torch.nn.Module):
    def __init__(self, model, alphas_cumprod):
        super().__init__()
        self.diffusion_model = model
        self.computation_dtype = torch.float32
        self.register_buffer("log_sigmas", (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).log(), persistent=False)

    def sigma_to_t(self, sigma):
        dists = sigma.log()[:, None] - self.log_sigmas[None]
        low = dists.ge(0).cumsum(1).argmax(1).clamp(max=self.log_sigmas.shape[0] - 2)
        lo, hi = self.log_sigmas[low], self.log_sigmas[low + 1]
        w = ((lo - sigma.log()) / (lo - hi)).clamp(0, 1)
        return (1 - w) * low + w * (low + 1)

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):  # noqa: B006
        sigma = t.reshape(-1, 1, 1, 1)
        xc = x / (sigma**2 + 1) ** 0.5
        eps = self.diffusion_model(xc, self.sigma_to_t(t), c_crossattn).float()
        return x - eps * sigma

    def memory_required(self, input_shape):
        return 0
