"""Hugging Face interchange: model directories, GGUF files, the weight-name table, export, tokenizer."""
