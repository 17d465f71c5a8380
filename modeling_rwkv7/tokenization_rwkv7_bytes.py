"""A byte-level subset of the RWKV world tokenizer: ids 0..256 only, for small models.

Ids 1..256 of the world vocabulary (``rwkv_vocab_v20230424``) are the 256 single bytes (id = byte + 1) and id 0 is
end-of-text. :class:`Rwkv7ByteTokenizer` keeps exactly these 257 ids: every text is encoded one byte per token,
and each id means the same as in the world tokenizer. A model trained on it has a 257-row embedding instead of
65536 (the project's shipped small model: 0.13 M embedding parameters instead of 33 M at width 256). Its ids are
valid world ids, so its text can be read by the world tokenizer (``decode``) and vice versa for byte tokens.

It is :class:`~modeling_rwkv7.tokenization_rwkv7.Rwkv7Tokenizer` with the vocabulary file
``rwkv_vocab_bytes.txt`` (the first 256 lines of the world file): greedy longest match over single bytes is plain
byte encoding. ``save_pretrained`` writes that file and ``tokenizer_config.json`` naming this class, and
``AutoTokenizer.from_pretrained`` finds the class after ``import modeling_rwkv7``.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from .tokenization_rwkv7 import END_OF_TEXT_ID, Rwkv7Tokenizer, utf8_bytes

BYTES_VOCAB_FILE_NAME = "rwkv_vocab_bytes.txt"
DEFAULT_BYTES_VOCAB_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), BYTES_VOCAB_FILE_NAME)
BYTE_VOCAB_SIZE = 257  # id 0 (end-of-text) + 256 bytes

__all__ = ["BYTE_VOCAB_SIZE", "Rwkv7ByteTokenizer"]


class Rwkv7ByteTokenizer(Rwkv7Tokenizer):
    """RWKV world tokenizer restricted to its single-byte tokens: ``id = byte + 1``, id 0 = end-of-text.

    Same arguments as :class:`Rwkv7Tokenizer`; ``vocab_file`` defaults to the ``rwkv_vocab_bytes.txt`` shipped in
    this package. ``vocab_size`` is 257.
    """

    vocab_files_names = {"vocab_file": BYTES_VOCAB_FILE_NAME}

    def __init__(self, vocab_file: str | os.PathLike | None = None, **kwargs: Any) -> None:
        super().__init__(vocab_file=vocab_file if vocab_file is not None else DEFAULT_BYTES_VOCAB_PATH, **kwargs)
        if self._tables.max_id != BYTE_VOCAB_SIZE - 1 or len(self._tables.bytes_to_id) != 256:
            raise ValueError(
                f"{self.vocab_file!r} is not a byte vocabulary (expected ids 1..256, one byte each); "
                "use Rwkv7Tokenizer for the full world vocabulary"
            )

    @property
    def vocab_size(self) -> int:
        """257: end-of-text (id 0) and the 256 bytes (ids 1..256)."""
        return self._tables.max_id + 1

    def encode_bytes(self, data: bytes | bytearray | memoryview) -> list[int]:
        return [b + 1 for b in bytes(data)]  # what the greedy match gives on a byte vocabulary, without the regex

    def encode_text(self, text: str) -> list[int]:
        # utf8_bytes: a str with lone surrogates gets the same clear error as the world tokenizer's.
        return [b + 1 for b in utf8_bytes(text)] if text else []

    def _convert_id_to_token(self, index: int) -> str:
        if not 0 <= index < self.vocab_size and index not in self._added_tokens_decoder:
            raise ValueError(f"token id {index} is outside the byte vocabulary (0..{self.vocab_size - 1})")
        return super()._convert_id_to_token(index)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        if not os.path.isdir(save_directory):
            raise ValueError(f"Vocabulary path ({save_directory}) should be a directory")
        out = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + BYTES_VOCAB_FILE_NAME)
        if not (os.path.exists(out) and os.path.samefile(out, self.vocab_file)):
            shutil.copyfile(self.vocab_file, out)
        return (out,)


def _register_with_auto_tokenizer() -> None:
    """Let ``AutoTokenizer`` resolve ``"tokenizer_class": "Rwkv7ByteTokenizer"`` in a saved folder. The model type
    ``rwkv7`` maps to the world tokenizer; a folder's own ``tokenizer_config.json`` names the class to use, and
    transformers looks such names up in the table that ``AutoTokenizer.register`` fills."""
    try:
        from transformers.models.auto import tokenization_auto
    except ImportError:  # pragma: no cover
        return
    table = getattr(tokenization_auto, "REGISTERED_TOKENIZER_CLASSES", None)
    if isinstance(table, dict):
        table[Rwkv7ByteTokenizer.__name__] = Rwkv7ByteTokenizer


_register_with_auto_tokenizer()
assert END_OF_TEXT_ID == 0
