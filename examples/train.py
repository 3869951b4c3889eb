"""Train a causal LM with length-normalized DPO: the ``hf-dpo`` command, runnable from a checkout.

    python examples/train.py [config.yaml] [--flag value ...]    # same as: hf-dpo [...]

No arguments run the offline demo. The logic lives in hf_dpo/cli/; see docs/usage.md.
"""

from hf_dpo.cli import command

if __name__ == "__main__":
    command()
