"""backend/modules/k_model.py: KModel.apply_model(x, sigma, ...) -> x0 through the engine's predictor."""

import torch


class KModel(torch.nn.Module):
    def __init__(self, model, predictor):
        super().__init__()
        self.diffusion_model = model
        self.predictor = predictor
        self.computation_dtype = torch.float32

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):  # noqa: B006
        sigma = t.reshape(-1, 1, 1, 1)
        xc = self.predictor.calculate_input(sigma, x)
        out = self.diffusion_model(xc, self.predictor.timestep(t), c_crossattn, control=control,
                                   transformer_options=transformer_options).float()
        return self.predictor.calculate_denoised(sigma, out, x)

    def memory_required(self, input_shape):  # Forge's estimate with PyTorch attention
        area = input_shape[0] * input_shape[2] * input_shape[3]
        return 1.28 * area * self.computation_dtype.itemsize * 16384
