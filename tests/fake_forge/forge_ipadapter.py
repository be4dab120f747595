"""What extensions-builtin/sd_forge_ipadapter/scripts/forge_ipadapter.py registers at start-up."""

from modules_forge.shared import add_supported_preprocessor
from modules_forge.supported_preprocessor import PreprocessorClipVision

add_supported_preprocessor(PreprocessorClipVision(
    name="CLIP-ViT-H (IPAdapter)",
    url="https://huggingface.co/h94/IP-Adapter/resolve/main/models/image_encoder/model.safetensors",
    filename="CLIP-ViT-H-14.safetensors"))
add_supported_preprocessor(PreprocessorClipVision(
    name="CLIP-ViT-bigG (IPAdapter)",
    url="https://huggingface.co/h94/IP-Adapter/resolve/main/sdxl_models/image_encoder/model.safetensors",
    filename="CLIP-ViT-bigG.safetensors"))
