"""Evaluation helpers: MATLAB-compatible bicubic resize and the SR papers' PSNR/SSIM on Y."""

from validation.imresize import imresize
from validation.metrics import psnr, rgb_to_y, shave, ssim

__all__ = ["imresize", "psnr", "rgb_to_y", "shave", "ssim"]
