"""Core types and settings: what the loaders may import (layer 0); nothing here imports above it."""
