"""Hugging Face interop: GPT-2 / Llama models <-> this project's runs (`python -m hf.convert`).

It sits above train/ (a converted run gets a fresh optimizer state) and reads and writes
checkpoints through checkpoint/, which knows nothing of it.
"""
