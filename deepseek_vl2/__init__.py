"""DeepSeek-VL2 inference on modern PyTorch: image + prompt -> processor -> model -> generation -> text.

    from deepseek_vl2 import VL2Pipeline
    pipe = VL2Pipeline.load("weights/deepseek-vl2-tiny")
    print(pipe.run("photo.png", "Describe this image.", temperature=0))
"""

from .config import DeepseekVL2Config
from .generation import GenerationConfig, generate, generate_stream
from .model import CheckpointError, DeepseekVL2, load_model
from .pipeline import VL2Pipeline
from .processor import DeepseekVL2Processor, InputError, ProcessedInputs, load_image

__all__ = [
    "CheckpointError",
    "DeepseekVL2",
    "DeepseekVL2Config",
    "DeepseekVL2Processor",
    "GenerationConfig",
    "InputError",
    "ProcessedInputs",
    "VL2Pipeline",
    "generate",
    "generate_stream",
    "load_image",
    "load_model",
]
