"""Shared helpers of the llm-from-scratch chapters: tokenizer, data, runtime, config, checkpoints, reports."""
