"""The RWKV "world" tokenizer (``rwkv_vocab_v20230424``) as a Hugging Face (Python/"slow") tokenizer.

The world tokenizer is *not* BPE: text is turned into UTF-8 bytes and cut greedily, left to right, taking at each
position the longest vocabulary entry that is a prefix of the remaining bytes. Every single byte is in the vocabulary,
so any byte string can be encoded. This module reproduces pip ``rwkv``'s ``TRIE_TOKENIZER`` id for id.

Vocabulary facts (see ``rwkv_vocab_v20230424.txt``): ids 1..65529, the longest token is 128 bytes, id 0 is the
end-of-text token (not in the file; it is the eos/bos/pad token here), ids 65530..65535 are unused rows of the
65536-row embedding. Useful ids: ``"\\n"`` = 11, ``" "`` = 33, ``"\\n\\n"`` = 261.

Speed: the greedy longest match runs inside the C regular-expression engine. The vocabulary is turned into one
regular expression shaped like its byte trie (``a(?:b(?:c)?|d)?``...). Because the children of a trie node start with
distinct bytes, at most one alternative can match at each step, and the greedy ``?`` on a node that is itself a token
tries the longer continuation first and backtracks to the node when no longer token matches -- which is exactly
"longest match". Alternatives are ordered by subtree size so the engine's linear scan over them hits common bytes
first. The compiled pattern and the tables are cached per vocabulary content, so building a second tokenizer in the
same process (``from_pretrained`` after ``save_pretrained``) costs almost nothing.

Token strings (what ``tokenize``/``convert_ids_to_tokens`` return): a token's bytes decoded as UTF-8 with
``errors="surrogateescape"``. Tokens that are valid UTF-8 read as themselves (``"\\n\\n"``, ``" the"``, ``"中国"``);
the bytes of a partial UTF-8 character show as lone surrogates (``b"\\xe4"`` -> ``"\\udce4"``). This mapping is
one-to-one and reversible (``s.encode("utf-8", "surrogateescape")``), so tokens can be joined and turned back into
exact bytes.
"""

from __future__ import annotations

import ast
import hashlib
import os
import re
import shutil
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from transformers.tokenization_utils_base import BatchEncoding
from transformers.tokenization_python import PreTrainedTokenizer
from transformers.utils import logging, to_py_obj

logger = logging.get_logger(__name__)

VOCAB_FILE_NAME = "rwkv_vocab_v20230424.txt"
VOCAB_FILES_NAMES = {"vocab_file": VOCAB_FILE_NAME}
END_OF_TEXT = "<|rwkv_tokenizer_end_of_text|>"
END_OF_TEXT_ID = 0
# Rows of the RWKV world embedding; the file fills ids 1..65529, the rest are unused.
EMBEDDING_VOCAB_SIZE = 65536
DEFAULT_VOCAB_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), VOCAB_FILE_NAME)

__all__ = [
    "END_OF_TEXT",
    "END_OF_TEXT_ID",
    "Rwkv7Tokenizer",
    "get_world_tokenizer",
    "load_rwkv_vocab",
    "utf8_bytes",
]


# ----------------------------------------------------------------------------------------------------------------
# Vocabulary parsing
# ----------------------------------------------------------------------------------------------------------------


def load_rwkv_vocab(path: str | os.PathLike) -> dict[int, bytes]:
    """Parse an RWKV vocabulary file into ``{id: token bytes}``.

    Each line is ``<id> <python str or bytes literal> <byte length>``; CRLF or LF line endings. Literals are parsed
    with :func:`ast.literal_eval` (never ``eval``: the file may come from a downloaded model folder).

    Raises:
        ValueError: the file is missing, unreadable, or a line is malformed (the message names the file and line),
            or a single byte is missing from the vocabulary (greedy matching then could get stuck).
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ValueError(f"RWKV vocabulary file {path!r} cannot be read: {e}") from e
    return _parse_vocab(raw, path)


def _parse_vocab(raw: bytes, path: str) -> dict[int, bytes]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line_no = raw[: e.start].count(b"\n") + 1
        raise ValueError(f"RWKV vocabulary file {path!r}, line {line_no}: not valid UTF-8 ({e})") from None

    id_to_bytes: dict[int, bytes] = {}
    seen: dict[bytes, int] = {}
    for line_no, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue  # tolerate a trailing newline / blank lines

        def bad(why: str) -> ValueError:
            shown = line if len(line) <= 80 else line[:77] + "..."
            return ValueError(f"RWKV vocabulary file {path!r}, line {line_no}: {why}: {shown!r}")

        first, last = line.find(" "), line.rfind(" ")
        if first <= 0 or last <= first:
            raise bad("expected '<id> <literal> <length>'")
        try:
            idx = int(line[:first])
            length = int(line[last + 1 :])
        except ValueError:
            raise bad("id and length must be integers") from None
        try:
            token = ast.literal_eval(line[first + 1 : last])
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise bad("token is not a python str/bytes literal") from None
        if isinstance(token, str):
            try:
                token = token.encode("utf-8")
            except UnicodeEncodeError:
                raise bad("token string is not encodable as UTF-8") from None
        if not isinstance(token, bytes):
            raise bad(f"token literal is a {type(token).__name__}, not str or bytes")
        if len(token) != length or length == 0:
            raise bad(f"token has {len(token)} bytes but the line says {length}")
        if idx <= 0 or idx >= EMBEDDING_VOCAB_SIZE:
            raise bad(f"id {idx} outside 1..{EMBEDDING_VOCAB_SIZE - 1} (id 0 is reserved for end-of-text)")
        if idx in id_to_bytes:
            raise bad(f"duplicate id {idx}")
        if token in seen:
            raise bad(f"token already has id {seen[token]}")
        id_to_bytes[idx] = token
        seen[token] = idx

    if not id_to_bytes:
        raise ValueError(f"RWKV vocabulary file {path!r} is empty")
    missing = [b for b in range(256) if bytes([b]) not in seen]
    if missing:
        raise ValueError(
            f"RWKV vocabulary file {path!r} lacks single-byte tokens for {len(missing)} byte values "
            f"(first: {missing[0]:#04x}); every byte must be a token so that any text can be encoded"
        )
    return id_to_bytes


# ----------------------------------------------------------------------------------------------------------------
# Text to bytes
# ----------------------------------------------------------------------------------------------------------------


def utf8_bytes(text: str) -> bytes:
    """``text`` as UTF-8 bytes (what both RWKV tokenizers cut into tokens).

    A Python ``str`` can hold lone surrogates (U+D800..U+DFFF, half of a UTF-16 pair): they come from text
    decoded with ``errors="surrogateescape"`` / ``"surrogatepass"``, from a JSON ``"\\ud800"`` escape, or from
    UTF-16 cut in the middle of a pair. They are not characters and have no UTF-8 bytes. We refuse them, as pip
    ``rwkv``'s TRIE_TOKENIZER and Hugging Face's fast (Rust) tokenizers do, but with a ``UnicodeEncodeError``
    (a ``ValueError``) that names the position and says how to clean the text. We do not encode them with
    ``errors="surrogatepass"``: that gives bytes that are not UTF-8 (``b"\\xed\\xa0\\x80"``), which the model never
    saw as text and which decode back to three U+FFFD, i.e. silently altered input.
    """
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        start, end = e.start, e.end
        near = text[max(0, start - 20) : end + 20]
        reason = (
            f"lone surrogate{'s' if end - start > 1 else ''} (half of a UTF-16 pair; not a Unicode character, so "
            f"it has no UTF-8 bytes to tokenize), in {near!r}. Clean the text before tokenizing, e.g. "
            "text.encode('utf-8', 'replace').decode('utf-8') (each becomes '?'); if the surrogates stand for raw "
            "bytes (text decoded with errors='surrogateescape'), tokenize those bytes: "
            "tokenizer.encode_bytes(text.encode('utf-8', 'surrogateescape'))"
        )
        # Same exception type as before (callers catching UnicodeEncodeError / ValueError keep working),
        # with the guidance in the reason; `from None` hides the bare codec error it replaces.
        raise UnicodeEncodeError("utf-8", text, start, end, reason) from None


# ----------------------------------------------------------------------------------------------------------------
# The matcher: tables + a trie-shaped regular expression, cached per vocabulary content
# ----------------------------------------------------------------------------------------------------------------

_ESCAPED_BYTE = [re.escape(bytes([b])) for b in range(256)]
# First bytes of tokens, roughly most frequent first in mixed prose/code/CJK text (space, newline, English letters
# by frequency, the UTF-8 lead bytes of CJK ideographs, punctuation, digits). Only an ordering hint for speed:
# the matches are the same whatever the order.
_ROOT_PRIOR = (
    b" \netaoinsrh"
    + bytes([0xE4, 0xE5, 0xE6, 0xE7, 0xE8, 0xE9])
    + b"ldcu.,\tmfpgwybv(')\"-_:=0123456789kx/;[]{}#*<>+jqzTSACIMPBRDEFHLNOWGUVKJYQXZ!?$%&@\\|^`~\r"
    + bytes([0xE3, 0xEA, 0xEB, 0xEC, 0xED, 0xEF, 0xE2, 0xF0, 0xD0, 0xD1, 0xCE, 0xCF, 0xC2, 0xC3])
)


def _trie_regex_source(tokens: Iterable[bytes]) -> bytes:
    """Build a regular expression (bytes) whose leftmost match at a position is the longest token there."""
    # Node: dict byte -> child node; key -1 marks "a token ends here".
    root: dict[int, Any] = {}
    for tok in tokens:
        node = root
        for b in tok:
            node = node.setdefault(b, {})
        node[-1] = True

    sizes: dict[int, int] = {}

    def size(node: dict[int, Any]) -> int:
        # Number of tokens below a node: a proxy for how often a branch is taken, used to order alternatives.
        n = 1 if -1 in node else 0
        for k, child in node.items():
            if k >= 0:
                n += size(child)
        sizes[id(node)] = n
        return n

    size(root)

    def emit(node: dict[int, Any]) -> bytes:
        kids = sorted((k for k in node if k >= 0), key=lambda k: -sizes[id(node[k])])
        parts = [_ESCAPED_BYTE[k] + emit(node[k]) for k in kids]
        if not parts:
            return b""
        terminal = -1 in node
        body = b"(?:" + b"|".join(parts) + b")" if (len(parts) > 1 or terminal) else parts[0]
        # A node that is a token: the continuation is optional and greedy (longest first, backtrack to here).
        return body + b"?" if terminal else body

    # The root is never a token (no empty token), so its alternation needs no group. The engine scans the root's
    # alternatives one by one for every token, so their order matters most here (measured: 1.5-2x on 10 MB of
    # text): common first bytes of real text first, then the other bytes by subtree size, and last the bytes
    # that cannot start a UTF-8 character (continuation bytes 0x80-0xBF, and 0xC0, 0xC1, 0xF5-0xFF).
    def root_rank(k: int) -> tuple[int, int]:
        pos = _ROOT_PRIOR.find(bytes([k]))
        if pos >= 0:
            return (0, pos)
        if 0x80 <= k <= 0xBF or k in (0xC0, 0xC1) or k >= 0xF5:
            return (2, -sizes[id(root[k])])
        return (1, -sizes[id(root[k])])

    kids = sorted((k for k in root if k >= 0), key=root_rank)
    return b"|".join(_ESCAPED_BYTE[k] + emit(root[k]) for k in kids)


@dataclass
class _VocabTables:
    """Everything derived from one vocabulary, shared (read-only) by all tokenizers built from the same content."""

    id_to_bytes: list[bytes]  # index = id, length EMBEDDING_VOCAB_SIZE (or more); unused ids -> b""
    bytes_to_id: dict[bytes, int]
    id_to_token: list[str | None]  # surrogateescape strings; None for unused ids
    token_to_id: dict[str, int]
    max_id: int
    _regex: re.Pattern[bytes] | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def regex(self) -> re.Pattern[bytes]:
        # Compiled lazily (about 1 s): a tokenizer used only for decoding never pays for it.
        if self._regex is None:
            with self._lock:
                if self._regex is None:
                    source = _trie_regex_source(self.bytes_to_id)
                    self._regex = re.compile(source, re.DOTALL)
        return self._regex


_TABLES_CACHE: dict[str, _VocabTables] = {}
_TABLES_LOCK = threading.Lock()


def _tables_for(path: str) -> _VocabTables:
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ValueError(f"RWKV vocabulary file {path!r} cannot be read: {e}") from e
    # Key on the parsed meaning rather than the raw bytes would cost a parse; CRLF vs LF copies just get two entries.
    key = hashlib.sha256(raw).hexdigest()
    with _TABLES_LOCK:
        cached = _TABLES_CACHE.get(key)
    if cached is not None:
        return cached

    vocab = _parse_vocab(raw, path)
    max_id = max(vocab)
    size = max(EMBEDDING_VOCAB_SIZE, max_id + 1)
    id_to_bytes = [b""] * size
    id_to_token: list[str | None] = [None] * size
    token_to_id: dict[str, int] = {}
    for idx, tok in vocab.items():
        id_to_bytes[idx] = tok
        s = tok.decode("utf-8", "surrogateescape")
        id_to_token[idx] = s
        token_to_id[s] = idx
    # Id 0 decodes to the end-of-text marker's text (as HF's decode of a special token does).
    id_to_bytes[END_OF_TEXT_ID] = END_OF_TEXT.encode("utf-8")
    id_to_token[END_OF_TEXT_ID] = END_OF_TEXT
    token_to_id[END_OF_TEXT] = END_OF_TEXT_ID
    tables = _VocabTables(
        id_to_bytes=id_to_bytes,
        bytes_to_id={tok: idx for idx, tok in vocab.items()},
        id_to_token=id_to_token,
        token_to_id=token_to_id,
        max_id=max_id,
    )
    with _TABLES_LOCK:
        return _TABLES_CACHE.setdefault(key, tables)


# ----------------------------------------------------------------------------------------------------------------
# The tokenizer
# ----------------------------------------------------------------------------------------------------------------


class Rwkv7Tokenizer(PreTrainedTokenizer):
    """RWKV "world" tokenizer: greedy longest match over UTF-8 bytes, identical ids to pip ``rwkv``'s TRIE_TOKENIZER.

    Args:
        vocab_file: path to ``rwkv_vocab_v20230424.txt`` (CRLF or LF). Defaults to the copy shipped in this package.
        eos_token, bos_token, pad_token: all default to ``"<|rwkv_tokenizer_end_of_text|>"``, id 0. Never set them
            to ``"\\n\\n"``: that is ordinary token 261, and marking it special makes ``skip_special_tokens`` drop it.
        padding_side: ``"right"`` (default) or ``"left"`` (use left for batched generation).
        errors: how :meth:`decode` handles byte sequences that are not valid UTF-8 (``"replace"`` by default; a
            token boundary can split a character). :meth:`decode_bytes` returns the exact bytes instead.
        split_special_tokens: ``True`` (default) treats the whole input as plain text, as TRIE_TOKENIZER does: the
            literal string ``"<|rwkv_tokenizer_end_of_text|>"`` in text is encoded byte by byte, not as id 0.
            Pass ``False`` to have special/added tokens written in the text map to their ids.

    No special tokens are ever added around a sequence (``add_special_tokens`` has no effect): RWKV prompts carry
    their own separators. ``len(tokenizer)`` counts the real tokens (ids 0..65529 -> 65530, plus added tokens);
    ``vocab_size`` reports the 65536 rows of the model's embedding.
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str | os.PathLike | None = None,
        eos_token: str = END_OF_TEXT,
        bos_token: str = END_OF_TEXT,
        pad_token: str = END_OF_TEXT,
        unk_token: str | None = None,
        padding_side: str = "right",
        errors: str = "replace",
        split_special_tokens: bool = True,
        clean_up_tokenization_spaces: bool = False,
        **kwargs: Any,
    ) -> None:
        self.vocab_file = os.fspath(vocab_file) if vocab_file is not None else DEFAULT_VOCAB_PATH
        self.errors = errors
        self._tables = _tables_for(self.vocab_file)
        super().__init__(
            eos_token=eos_token,
            bos_token=bos_token,
            pad_token=pad_token,
            unk_token=unk_token,
            padding_side=padding_side,
            errors=errors,
            split_special_tokens=split_special_tokens,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )
        for name in ("eos_token", "bos_token", "pad_token"):
            tok = getattr(self, name, None)
            if tok is not None and self._tables.token_to_id.get(str(tok)) not in (None, END_OF_TEXT_ID):
                # The fla-hub pitfall: eos "\n\n" would make skip_special_tokens drop every paragraph break.
                logger.warning(
                    f"{name}={str(tok)!r} is an ordinary RWKV token (id {self._tables.token_to_id[str(tok)]}); "
                    f"the RWKV end-of-text token is {END_OF_TEXT!r} (id 0)."
                )

    # ---- sizes and vocabulary -------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Rows of the RWKV world embedding (65536), including the unused ids 65530..65535."""
        return max(EMBEDDING_VOCAB_SIZE, self._tables.max_id + 1)

    def get_vocab(self) -> dict[str, int]:
        """Token string -> id for id 0 (end-of-text), every vocabulary token, and any added tokens."""
        vocab = dict(self._tables.token_to_id)
        vocab.update(self._added_tokens_encoder)
        return vocab

    # ---- encoding --------------------------------------------------------------------------------------------

    def encode_bytes(self, data: bytes | bytearray | memoryview) -> list[int]:
        """Token ids of a raw byte string (no special tokens; any bytes, valid UTF-8 or not)."""
        table = self._tables.bytes_to_id
        return [table[m] for m in self._tables.regex.findall(bytes(data))]

    def encode_text(self, text: str) -> list[int]:
        """Token ids of ``text`` exactly as ``TRIE_TOKENIZER.encode`` gives them (strict UTF-8, no special tokens).

        A ``str`` holding lone surrogates raises ``UnicodeEncodeError`` (a ``ValueError``) naming the position
        and how to clean the text (:func:`utf8_bytes`), as TRIE_TOKENIZER refuses it too.
        """
        if not text:
            return []
        table = self._tables.bytes_to_id
        return [table[m] for m in self._tables.regex.findall(utf8_bytes(text))]

    def tokenize(self, text: str, **kwargs: Any) -> list[str]:
        # With split_special_tokens=False the base class cuts the text around added tokens before
        # _tokenize sees it: check the whole text first, so an error gives the position in the caller's text.
        if isinstance(text, str):
            utf8_bytes(text)
        return super().tokenize(text, **kwargs)

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        id_to_token = self._tables.id_to_token
        return [id_to_token[i] for i in self.encode_text(text)]  # type: ignore[misc]

    def _convert_token_to_id(self, token: str) -> int | None:
        # Unknown strings give None, which equals unk_token_id (there is no unknown token in a byte-level vocab).
        return self._tables.token_to_id.get(token)

    def _convert_id_to_token(self, index: int) -> str:
        table = self._tables.id_to_token
        if not 0 <= index < len(table):
            raise ValueError(f"token id {index} is outside the RWKV vocabulary (0..{len(table) - 1})")
        tok = table[index]
        return "" if tok is None else tok  # unused embedding rows 65530..65535 carry no text

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self._tokens_to_bytes(tokens).decode("utf-8", self.errors)

    @staticmethod
    def _tokens_to_bytes(tokens: Iterable[str]) -> bytes:
        # Token strings are surrogateescape-decoded bytes; joining then re-encoding restores the exact byte stream,
        # so a character split over two tokens comes back whole.
        return "".join(tokens).encode("utf-8", "surrogateescape")

    def _fast_path_ok(self, kwargs: dict[str, Any]) -> bool:
        return bool(kwargs.get("split_special_tokens", self.split_special_tokens)) and not kwargs.get(
            "sanitize_control_tokens"
        )

    def _encode_plus(self, text: Any, text_pair: Any = None, **kwargs: Any) -> BatchEncoding:
        # HF's path is tokenize() -> token strings -> convert_tokens_to_ids(); when the text is to be read as
        # plain text (the default) we go straight to ids, which is identical and several times faster.
        # Batches come back here one item at a time through the base implementation.
        if self._fast_path_ok(kwargs):
            if isinstance(text, str) and text:
                text = self.encode_text(text)
            if isinstance(text_pair, str) and text_pair:
                text_pair = self.encode_text(text_pair)
        return super()._encode_plus(text, text_pair=text_pair, **kwargs)

    # ---- no special tokens around sequences ---------------------------------------------------------------------

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        """RWKV adds nothing: the ids are returned as they are (pairs are concatenated)."""
        return list(token_ids_0) if token_ids_1 is None else list(token_ids_0) + list(token_ids_1)

    def get_special_tokens_mask(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None, already_has_special_tokens: bool = False
    ) -> list[int]:
        if already_has_special_tokens:
            special = set(self.all_special_ids)
            return [1 if i in special else 0 for i in list(token_ids_0) + list(token_ids_1 or [])]
        return [0] * (len(token_ids_0) + len(token_ids_1 or []))

    def create_token_type_ids_from_sequences(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        return [0] * (len(token_ids_0) + len(token_ids_1 or []))

    # ---- decoding ----------------------------------------------------------------------------------------------

    def decode_bytes(self, token_ids: Any, skip_special_tokens: bool = False) -> bytes:
        """The exact bytes of ``token_ids`` (a list, tuple, tensor or array of ints); may be invalid UTF-8.

        For vocabulary ids this equals ``TRIE_TOKENIZER.decodeBytes``. Id 0 gives the text of the end-of-text token
        unless ``skip_special_tokens``; unused ids 65530..65535 give nothing unless a token was added there.
        """
        if isinstance(token_ids, list):
            ids = token_ids  # the hot path: to_py_obj would walk a long list element by element
        elif isinstance(token_ids, int):
            ids = [token_ids]
        else:
            ids = to_py_obj(token_ids)  # tensors, arrays, numpy scalars
            ids = [ids] if isinstance(ids, int) else list(ids)
        if skip_special_tokens:
            special = set(self.all_special_ids)
            ids = [i for i in ids if i not in special]
        table = self._tables.id_to_bytes
        added = self._added_tokens_decoder
        if ids and not added.keys() - {END_OF_TEXT_ID}:
            lo, hi = min(ids), max(ids)
            if lo >= 0 and hi < len(table):
                return b"".join(map(table.__getitem__, ids))  # the common case, no per-id checks
        out = []
        for i in ids:
            i = int(i)
            if i in added and not (0 <= i < len(table) and table[i]):
                out.append(added[i].content.encode("utf-8", "surrogateescape"))
            elif 0 <= i < len(table):
                out.append(table[i])
            else:
                raise ValueError(f"token id {i} is outside the RWKV vocabulary (0..{len(table) - 1})")
        return b"".join(out)

    def decode(self, token_ids: Any, skip_special_tokens: bool = False, **kwargs: Any) -> str | list[str]:
        """Decode ids (or a batch of them) to text; ``errors=`` overrides how invalid UTF-8 is handled.

        Bytes that are not valid UTF-8 (a token boundary can split a character) become U+FFFD by default; use
        :meth:`decode_bytes` for the exact bytes.
        """
        if isinstance(token_ids, list) and (not token_ids or isinstance(token_ids[0], int)):
            # A flat list of ints: skip the base class's element-by-element to_py_obj walk (slow on long lists).
            return self._decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs)
        return super().decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs)

    def _decode(
        self,
        token_ids: int | list[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        errors: str | None = None,
        **kwargs: Any,
    ) -> str:
        text = self.decode_bytes(token_ids, skip_special_tokens=skip_special_tokens).decode(
            "utf-8", errors or self.errors
        )
        if clean_up_tokenization_spaces if clean_up_tokenization_spaces is not None else self.clean_up_tokenization_spaces:
            text = self.clean_up_tokenization(text)
        return text

    # ---- saving --------------------------------------------------------------------------------------------

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        """Copy the vocabulary file into ``save_directory`` (byte for byte)."""
        if not os.path.isdir(save_directory):
            raise ValueError(f"Vocabulary path ({save_directory}) should be a directory")
        out = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILE_NAME)
        if not (os.path.exists(out) and os.path.samefile(out, self.vocab_file)):
            shutil.copyfile(self.vocab_file, out)
        return (out,)


def get_world_tokenizer(**kwargs: Any) -> Rwkv7Tokenizer:
    """The RWKV world tokenizer built from the vocabulary shipped in this package (no hub access).

    Keyword arguments go to :class:`Rwkv7Tokenizer` (e.g. ``padding_side="left"``).
    """
    return Rwkv7Tokenizer(vocab_file=DEFAULT_VOCAB_PATH, **kwargs)
