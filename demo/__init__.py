"""The demo: a small Gemma 4 Unified model trained here on synthetic image, audio and text questions."""
