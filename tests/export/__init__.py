"""Tests of cpt_plugin.export: merged 16-bit and GGUF export."""
