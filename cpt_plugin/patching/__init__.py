"""Swaps cpt-plugin's kernels into transformers' model classes.

``registry.patch`` / ``registry.unpatch`` are the entry points (re-exported as ``cpt_plugin.patch``);
``family.FamilySpec`` declares where the kernels plug into one modeling module; ``causal_lm`` holds the
causal-LM forward that computes the loss without building the logits.
"""
