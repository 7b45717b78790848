from .tokenizer import build_offline_clip_tokenizer, clip_bpe_vocabulary_path

__all__ = ["build_offline_clip_tokenizer", "clip_bpe_vocabulary_path"]
