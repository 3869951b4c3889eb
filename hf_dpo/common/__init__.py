"""Helpers every stage imports: how to reach the model inside its wrappers, and how flags parse.

This folder imports nothing else of hf_dpo, so any stage may use it.
"""
