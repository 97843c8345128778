"""GGUF (llama.cpp) files: reading, dequantization, Gemma 3 / llama mapping, the tokenizer, and export."""

from .dequant import GGML_TYPES, dequantize, supported_types
from .mapping import gguf_to_hf_config, gguf_to_hf_name, load_gguf, load_gguf_tokenizer
from .reader import GGUFFile, GGUFTensorInfo, read_gguf
from .tokenizer import gguf_tokenizer, gguf_tokenizer_json
from .writer import export_gguf

__all__ = [
    "GGML_TYPES", "GGUFFile", "GGUFTensorInfo", "dequantize", "export_gguf", "gguf_to_hf_config", "gguf_to_hf_name",
    "gguf_tokenizer", "gguf_tokenizer_json", "load_gguf", "load_gguf_tokenizer", "read_gguf", "supported_types",
]
