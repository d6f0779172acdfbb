"""Local tokenizer and model builders: tiny Qwen-shaped models built from scratch, no Hugging Face hub."""

from verl_gq.models.tiny import (
    CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    build_qwen_model,
    format_chat,
    save_model_dir,
    tiny_corpus,
    train_tokenizer,
)

__all__ = ["CHAT_TEMPLATE", "SPECIAL_TOKENS", "build_qwen_model", "format_chat", "save_model_dir", "tiny_corpus",
           "train_tokenizer"]
