"""What every model here adds to `nn.Module`: the dtype and device of its weights, as diffusers' models
report them (`pipe.unet.dtype`, `pipe.vae.device`)."""

import torch
from torch import nn


class Model(nn.Module):
    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device
