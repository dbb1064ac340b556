"""Export: trained models to files other runtimes load (GGUF for llama.cpp / Ollama)."""
