"""gemmaforge: faithful, hackable PyTorch for Gemma 3 / Gemma 4 / Mistral.

    import gemmaforge
    model = gemmaforge.from_pretrained("gemma-3-270m")        # the embedded default
    tok = gemmaforge.load_tokenizer("gemma-3-270m")
    print(gemmaforge.generate(model, tok, "The capital of France is", max_new_tokens=16))
"""

__version__ = "0.1.0"

from .api import from_config, from_pretrained, load_processor, load_tokenizer  # noqa: E402
from .inference.chat import chat  # noqa: E402
from .inference.batch import generate_batch  # noqa: E402
from .inference.generate import generate  # noqa: E402
from .models.registry import preset  # noqa: E402
from .rl.score import score  # noqa: E402

__all__ = ["from_pretrained", "from_config", "load_tokenizer", "load_processor", "generate", "generate_batch", "chat", "preset", "score"]
