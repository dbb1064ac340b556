"""Data: reading rows, rendering chats with completion-only labels, batching."""

from peftlab.data.collate import IGNORE_INDEX, length_grouped_batches, pad_collate
from peftlab.data.readers import SUPPORTED_EXTENSIONS, DataError, ReadReport, read_records
from peftlab.data.sft import (
    DEFAULT_CHAT_TEMPLATE,
    ChatTemplateError,
    SFTStats,
    build_sft_examples,
    encode_prompt,
    ensure_chat_template,
    record_to_messages,
    render_prompt,
    tokenize_conversation,
)

__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "IGNORE_INDEX",
    "SUPPORTED_EXTENSIONS",
    "ChatTemplateError",
    "DataError",
    "ReadReport",
    "SFTStats",
    "build_sft_examples",
    "encode_prompt",
    "ensure_chat_template",
    "length_grouped_batches",
    "pad_collate",
    "read_records",
    "record_to_messages",
    "render_prompt",
    "tokenize_conversation",
]
