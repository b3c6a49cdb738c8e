"""The Hugging Face Hub: link parsing, file kinds, downloads and memory fit estimates."""
