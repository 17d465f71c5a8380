"""RWKV-7 ("Goose", x070) for Hugging Face transformers.

Importing this package registers ``model_type="rwkv7"`` with ``AutoConfig``, ``AutoModel``,
``AutoModelForCausalLM`` and ``AutoTokenizer`` (no ``trust_remote_code``). If another installed
package registered ``rwkv7`` first (e.g. flash-linear-attention), ours replaces it for the
auto classes once imported.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from .cache_rwkv7 import Rwkv7Cache, Rwkv7State
from .configuration_rwkv7 import Rwkv7Config
from .convert import CheckpointFormatError, convert_rwkv_checkpoint
from .modeling_rwkv7 import Rwkv7ForCausalLM, Rwkv7Model, Rwkv7PreTrainedModel
from .tokenization_rwkv7 import Rwkv7Tokenizer, get_world_tokenizer
from .tokenization_rwkv7_bytes import Rwkv7ByteTokenizer  # registers the class name with AutoTokenizer

AutoConfig.register("rwkv7", Rwkv7Config, exist_ok=True)
AutoModel.register(Rwkv7Config, Rwkv7Model, exist_ok=True)
AutoModelForCausalLM.register(Rwkv7Config, Rwkv7ForCausalLM, exist_ok=True)
AutoTokenizer.register(Rwkv7Config, slow_tokenizer_class=Rwkv7Tokenizer, exist_ok=True)

__all__ = [
    "CheckpointFormatError",
    "Rwkv7Cache",
    "Rwkv7Config",
    "Rwkv7ForCausalLM",
    "Rwkv7Model",
    "Rwkv7PreTrainedModel",
    "Rwkv7State",
    "Rwkv7ByteTokenizer",
    "Rwkv7Tokenizer",
    "convert_rwkv_checkpoint",
    "get_world_tokenizer",
]
